"""Atomic writes: a file is either its previous content or its complete new content, never half.

Everything is written to a temporary name in the same folder (same file system) and renamed onto
the target with :func:`os.replace`, an atomic rename on POSIX. A failure (or an interrupt) removes
the temporary file and leaves the target as it was.

>>> with atomic_path("table.parquet") as tmp:      # doctest: +SKIP
...     pq.write_table(table, tmp)
>>> write_json_atomic(run / "latest.json", {"checkpoint": "checkpoints/step-00000010"})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden, unused name next to ``path``: ``.{name}.{tag}-{pid}-{random}``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name next to ``path``; on success it replaces ``path``, on any
    exception it is deleted and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, *, indent: int | None = 1, **kwargs) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (``kwargs`` go to :func:`json.dumps`;
    ``default=float`` unless given, so numpy scalars serialise)."""
    kwargs.setdefault("default", float)
    return write_text_atomic(path, json.dumps(obj, indent=indent, **kwargs))
