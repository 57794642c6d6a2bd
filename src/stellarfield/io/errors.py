"""Errors raised by the readers: each names the file and the reason."""

from __future__ import annotations

from pathlib import Path

from stellarfield.errors import StellarfieldError


class SpectrumReadError(StellarfieldError):
    """A file that should hold a spectrum could not be read.

    The message always starts with the file's path, then the reason, e.g.
    ``"data/x.fits: truncated FITS file (HDU 1 is shorter than its header says)"``.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnknownFormatError(SpectrumReadError):
    """No registered reader recognises the file's content."""
