"""``python -m stellarfield`` (and ``torchrun -m stellarfield``): the ``stellarfield`` command."""

import sys

from stellarfield.cli import main

if __name__ == "__main__":
    sys.exit(main())
