"""What every sub-command shares: exit statuses, the one-line error, argparse value types, the parser class,
and the input checks of the report commands (bench, explain)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stellarfield.errors import StellarfieldError

#: Exit status for errors in the user's input (a bad file, an existing dataset, ...).
EXIT_USAGE = 2
#: Exit status for an unexpected failure (a bug: ``--debug`` shows the traceback).
EXIT_INTERNAL = 1

#: Help of ``--model`` (resolved by :func:`stellarfield.model.checkpoint.load_model`).
MODEL_HELP = "run folder, or 'reference' for the model shipped with stellarfield"
#: Help of ``--device`` (choices from :data:`stellarfield.device.DEVICES`).
DEVICE_HELP = ("where the model runs: %(choices)s (auto: a CUDA GPU if torch sees one, else the CPU; "
               "see stellarfield.device)")


class CommandError(StellarfieldError):
    """An error to show the user as one line, without a traceback."""


# --- argument types: a bad value is refused by argparse, naming the option ---------------------
def _parse(text: str, kind: type, expected: str):
    """``kind(text)``, or an argparse error that says what was ``expected``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _refuse(text: str, what: str):
    raise argparse.ArgumentTypeError(f"must be {what}, got {text}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _parse(text, int, "a whole number >= 1")
    if value < 1:
        _refuse(text, ">= 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _parse(text, int, "a whole number >= 0")
    if value < 0:
        _refuse(text, ">= 0")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _parse(text, float, "a number > 0")
    if not (value > 0) or value == float("inf"):
        _refuse(text, "a finite number > 0")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    value = _parse(text, float, "a number")
    if value != value or value in (float("inf"), float("-inf")):
        _refuse(text, "a finite number")
    return value


def radial_velocity(text: str) -> float:
    """argparse type: a radial velocity in km/s, below the speed of light; one beyond the fastest
    star known (:data:`~stellarfield.physics.doppler.FASTEST_STAR_KMS`) is taken with a warning."""
    from stellarfield.physics.doppler import C_KMS, FASTEST_STAR_KMS, velocity_problem

    value = finite_float(text)
    if velocity_problem(value):
        _refuse(text, f"a radial velocity in km/s with |v| below the speed of light ({C_KMS} km/s)")
    if abs(value) > FASTEST_STAR_KMS:
        warn(f"--rv {value:g} km/s is beyond any star known (the fastest recedes at ~1,017 km/s); "
             "taken as given")
    return value


def warn(message: str) -> None:
    """A one-line warning on stderr, for what a user must see on the terminal (not only in a table)."""
    print(f"stellarfield: warning: {message}", file=sys.stderr)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that points at ``--help``."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --- outputs ------------------------------------------------------------------------------------
def refuse_existing_output(out: str | Path, force: bool) -> None:
    """The rule of the commands whose library writers replace a file (fit, predict, plot): an existing
    ``--out`` is never replaced without ``--force``. Checked before any work is done. (The library
    functions behind ingest, merge, generate, export and prior refuse an existing output themselves;
    bench and explain a folder that holds their report.)"""
    if Path(out).exists() and not force:
        kind = "folder" if Path(out).is_dir() else "file"
        raise CommandError(f"{out} already exists (a {kind}); pass --force to replace it, or choose another --out")


# --- checks the report commands (bench, explain) make before any work -------------------------
def check_inputs(args: argparse.Namespace, report_file: str, what: str, minimums: dict[str, int]) -> Path:
    """The checks ``bench`` and ``explain`` make before any work: no report to overwrite without
    ``--force``, every ``--data`` a dataset, and each option in ``minimums`` at least its minimum.
    Returns the report folder."""
    out = Path(args.out)
    if (out / report_file).exists() and not args.force:
        raise CommandError(f"{out} already holds {what}; pass --force to overwrite it, or choose another folder")
    require_datasets(args.data)
    for name, least in minimums.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise CommandError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    return out


def require_datasets(paths) -> None:
    """CommandError unless every path is a stellarfield dataset folder."""
    from stellarfield.data.store import is_dataset

    for path in paths:
        if not is_dataset(path):
            raise CommandError(f"{path} is not a dataset (no manifest); make one with 'stellarfield ingest'")


def resolve_cli_device(device: str) -> str:
    """``--device`` resolved (``auto`` to CUDA or the CPU); an unusable one is a :class:`CommandError`."""
    if device == "cpu":
        return device
    from stellarfield.device import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
