"""The ``stellarfield`` command line (entry point :func:`main`); see :mod:`stellarfield.cli.app`."""

from stellarfield.cli.app import build_parser, main, user_errors
from stellarfield.cli.arguments import (EXIT_INTERNAL, EXIT_USAGE, CommandError, finite_float, non_negative_int,
                                        positive_float, positive_int)

__all__ = ["main", "build_parser", "user_errors", "CommandError", "EXIT_USAGE", "EXIT_INTERNAL",
           "positive_int", "non_negative_int", "positive_float", "finite_float"]
