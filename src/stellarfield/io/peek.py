"""A cheap look at a file's content, for format detection and clear errors on bad input.

:func:`peek_file` opens a file once and checks what can go wrong before any reader runs: a path
that does not exist, an empty file, bytes that are not FITS, a FITS file shorter than its headers
say (truncated, plain or gzipped: every HDU's data must be in the file before any of it is read, so
a header that declares more pixels than the file holds is refused before anything is allocated).
Readers' ``identify`` functions then ask for headers by HDU index.
"""

from __future__ import annotations

import gzip
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from stellarfield.io.errors import SpectrumReadError

FITS_MAGIC = b"SIMPLE  ="
GZIP_MAGIC = b"\x1f\x8b"
#: File endings treated as text (documentation, tables) rather than spectra.
TEXT_SUFFIXES = {".md", ".txt", ".tsv", ".csv", ".db", ".json", ".rst", ".dat", ".py", ".yaml", ".yml"}


@dataclass
class FilePeek:
    """What a reader may look at to decide whether a file is its format.

    kind:
        ``"fits"``, ``"fits.gz"`` or ``"text"``.
    """

    path: Path
    kind: str
    _hdul: object | None = field(default=None, repr=False)
    _headers: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def header(self, index: int = 0):
        """The FITS header of HDU ``index`` (None if the file has fewer HDUs or is not FITS)."""
        if self.kind == "text":
            return None
        if index not in self._headers:
            self._headers[index] = self._read_header(index)
        return self._headers[index]

    def _read_header(self, index: int):
        from astropy.io import fits

        if self._hdul is None:
            self._hdul = fits.open(self.path, memmap=False, lazy_load_hdus=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._hdul[index].header
        except (IndexError, OSError):
            return None

    def close(self) -> None:
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None


def peek_file(path: str | Path) -> FilePeek:
    """Open ``path`` just enough to know what it is, or raise :class:`SpectrumReadError` saying why not."""
    path = Path(path)
    if not path.exists():
        raise SpectrumReadError(path, "no such file or folder")
    if path.is_dir():
        raise SpectrumReadError(path, "is a folder, not a file")
    size = path.stat().st_size
    if size == 0:
        raise SpectrumReadError(path, "empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(len(FITS_MAGIC))
        except (OSError, EOFError) as exc:
            raise SpectrumReadError(path, f"corrupt gzip file ({exc})") from exc
        if not inner.startswith(FITS_MAGIC):
            raise SpectrumReadError(path, "gzip file that does not hold a FITS file")
        _check_not_truncated(path, _gzip_size(path, size), "decompressed ")
        return FilePeek(path, "fits.gz")
    if head.startswith(FITS_MAGIC):
        _check_not_truncated(path, size)
        return FilePeek(path, "fits")
    if path.suffix.lower() in TEXT_SUFFIXES and _looks_like_text(path):
        return FilePeek(path, "text")
    what = "random or binary bytes" if not _looks_like_text(path) else "a text file"
    raise SpectrumReadError(path, f"not a FITS file (it holds {what}; FITS files start with 'SIMPLE  =')")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as fh:
        chunk = fh.read(4096)
    if b"\x00" in chunk:
        return False
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        try:
            chunk.decode("latin-1")
            return sum(c < 9 for c in chunk) == 0
        except UnicodeDecodeError:  # pragma: no cover
            return False
    return True


#: Largest ratio of decompressed to compressed size deflate can reach (1032:1).
MAX_DEFLATE_RATIO = 1032


def _gzip_size(path: Path, compressed_size: int) -> int:
    """Decompressed size of a gzip file from its trailer (ISIZE, the size modulo 2**32), checked
    against what deflate can reach; counted by decompressing when the trailer cannot say."""
    with open(path, "rb") as fh:
        fh.seek(-4, 2)
        size = struct.unpack("<I", fh.read(4))[0]
    if compressed_size < 2**32 // MAX_DEFLATE_RATIO and size <= compressed_size * MAX_DEFLATE_RATIO:
        return size
    return _decompressed_length(path)


def _decompressed_length(path: Path) -> int:
    n = 0
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(1 << 22):
                n += len(chunk)
    except (OSError, EOFError) as exc:
        raise SpectrumReadError(path, f"corrupt gzip file ({exc})") from exc
    return n


def _check_not_truncated(path: Path, size: int, what: str = "") -> None:
    """Walk the HDU headers (no data read) and check the file holds all the data they announce
    (``size``: the file's bytes, decompressed for a gzip file)."""
    from astropy.io import fits

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
                end = 0
                i = 0
                while True:
                    try:
                        hdu = hdul[i]
                    except IndexError:
                        break
                    info = hdu.fileinfo()
                    end = max(end, info["datLoc"] + info["datSpan"])
                    i += 1
    except SpectrumReadError:
        raise
    except Exception as exc:
        raise SpectrumReadError(path, f"corrupt or truncated FITS file ({type(exc).__name__}: {exc})") from exc
    if i == 0:
        raise SpectrumReadError(path, "FITS file without a single complete HDU header")
    if end > size and what and _decompressed_length(path) >= end:  # a multi-member gzip: ISIZE is the last's
        return
    if end > size:
        raise SpectrumReadError(path, f"truncated FITS file: headers announce {end} bytes, {what}file has {size}")
