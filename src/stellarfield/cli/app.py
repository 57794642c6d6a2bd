"""The ``stellarfield`` command: the parser of every sub-command, and ``main``.

Sub-commands live one group per module: :mod:`~stellarfield.cli.data` (ingest, info, plot),
:mod:`~stellarfield.cli.model` (train, generate, fit, predict, export, demo),
:mod:`~stellarfield.cli.bench` and :mod:`~stellarfield.cli.explain`. Each has ``add_commands(sub)``.

Every mistake in the input (a missing file, a damaged dataset, an argument out of range) is one
line on stderr, ``stellarfield COMMAND: error: WHAT (what to do)``, and exit status 2; an
unexpected failure is one line and exit status 1. ``--debug`` (before or after the command) shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from stellarfield.cli import bench, data, explain, model
from stellarfield.cli.arguments import EXIT_INTERNAL, EXIT_USAGE, Parser
from stellarfield.errors import StellarfieldError

#: The command groups, in the order ``stellarfield --help`` lists them.
COMMAND_GROUPS = (data, model, bench, explain)


def build_parser() -> argparse.ArgumentParser:
    from stellarfield import __version__

    parser = Parser(
        prog="stellarfield",
        description="Learn one generative model of stellar spectra from many surveys at native resolution.",
    )
    parser.add_argument("--version", action="version", version=f"stellarfield {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    for command in sub.choices.values():  # --debug also after the command; SUPPRESS keeps a top-level one
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error instead of one line")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"stellarfield {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, user_errors()):
            print(f"stellarfield {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        print(f"stellarfield {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(a bug: run again with --debug for the traceback, and report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; an OSError as ``file: reason``."""
    if isinstance(exc, OSError) and not isinstance(exc, StellarfieldError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror.lower()}"
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError) adds quotes
    return " ".join(text.split())


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (bad files, existing folders, broken runs, the file system):
    :class:`~stellarfield.errors.StellarfieldError` and the errors defined outside this package's
    own modules, listed here. Shown as one line, no traceback."""
    from stellarfield.io.demo_sources import DemoDataNotInstalled
    from stellarfield.io.errors import SpectrumReadError

    errors: list[type[BaseException]] = [StellarfieldError, SpectrumReadError, DemoDataNotInstalled, OSError]
    # model modules are imported only by the model commands
    for module, name in (("stellarfield.model.generate", "OutOfRangeError"),
                         ("stellarfield.model.reference", "ModelExportError"),
                         ("stellarfield.bench.run", "BenchInputError"),
                         ("stellarfield.eval.explain", "ExplainInputError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
