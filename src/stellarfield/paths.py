"""Real paths of many files in few folders, resolved cheaply.

``Path.resolve()`` asks the operating system about every folder of the path, for every file: for
the 1,239 library files of the demo, deep in a virtual environment, that was 40,000 ``lstat``
calls per ingest. :func:`real_path` resolves each folder once and asks only whether the file itself
is a link. Folders stay resolved until ``real_path.cache_clear()`` (ingest calls it when it lists
its sources, so that a link pointed elsewhere between two ingests is followed).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def real_path(path: str | Path) -> Path:
    """``Path(path).resolve()``: absolute, with every symbolic link resolved (the file's own too)."""
    text = os.fspath(path)
    if ".." in text.split(os.sep):  # a link before "..": only the full walk gets it right
        return Path(text).resolve()
    text = os.path.abspath(text)
    if os.path.islink(text):
        return Path(text).resolve()
    folder, name = os.path.split(text)
    return Path(os.path.join(_real_folder(folder), name))


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


real_path.cache_clear = _real_folder.cache_clear  # type: ignore[attr-defined]
