"""The one base class of stellarfield's errors about the user's input.

Every error caused by what the user gave (a missing or unreadable file, a damaged dataset, a broken
run folder, an argument out of range) derives from :class:`StellarfieldError` where it is defined in
the package, or is listed beside it in :func:`stellarfield.cli.user_errors`. The command line shows
such an error as one line on stderr (the file, what is wrong, what to do) and exits non-zero;
``--debug`` shows the traceback instead. Anything else is a bug.
"""

from __future__ import annotations


class StellarfieldError(Exception):
    """An error in the user's input; its message names the file (or argument), what is wrong and,
    where there is one, what to do about it."""


class ConfigError(StellarfieldError, ValueError):
    """A configuration file that is missing, not valid JSON, or holds an unknown key or bad value."""
