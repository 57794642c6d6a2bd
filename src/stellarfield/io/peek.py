"""A cheap look at a file's content, for format detection and clear errors on bad input.

:func:`peek_file` opens a file once and checks what can go wrong before any reader runs: a path
that does not exist, an empty file, bytes that are not FITS, a FITS file shorter than its headers
say (truncated, plain or gzipped: every HDU's data must be in the file before any of it is read, so
a header that declares more pixels than the file holds is refused before anything is allocated).
Readers' ``identify`` functions then ask for headers by HDU index.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.fits_cards import BITPIX_DTYPES, BLOCK, CARD, data_size, parse_header  # FITS structure

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
    #: Each HDU's header bytes, kept by the structure check (None: not kept), so that a header is
    #: parsed from them (:func:`~stellarfield.io.fits_cards.parse_header`, or astropy's
    #: ``Header.fromstring`` for cards it declines) without opening the file again.
    _raw_headers: list[bytes] | None = field(default=None, repr=False)
    #: Outcomes of checks already made on this peek (the registry's header-unit check, by product:
    #: None when it passed, else the reason it failed), so that a later read does not redo them.
    _verdicts: dict = field(default_factory=dict, repr=False)
    #: The rows of the table a columnar reader reads from the file, as its headers say (None:
    #: not a table, or not known); set by :func:`~stellarfield.io.registry.classify_peek`.
    n_rows: int | None = None

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

        if self._raw_headers is not None:
            if not 0 <= index < len(self._raw_headers):
                return None
            header = parse_header(self._raw_headers[index])  # plain cards, 10x faster than astropy
            if header is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    header = fits.Header.fromstring(self._raw_headers[index])
            if header.get("ZIMAGE") is not True:  # a tile-compressed image: astropy shows the image's header
                return header
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

    def compact(self) -> "FilePeek":
        """The same peek without its headers (open file, parsed and raw headers), keeping the
        outcome of the checks made on it: small enough to send to another process and to keep one
        per file while a batch is identified, so that the read of the file needs no second look
        (``read_spectra(path, format, peek=...)``). A header asked of it is read again from the file."""
        return FilePeek(self.path, self.kind, _verdicts=dict(self._verdicts), n_rows=self.n_rows)


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
        return FilePeek(path, "fits.gz", _raw_headers=_check_not_truncated(path, None, gzip_trailer_size(path, size)))
    if head.startswith(FITS_MAGIC):
        return FilePeek(path, "fits", _raw_headers=_check_not_truncated(path, size))
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


BITPIX_VALUES = tuple(BITPIX_DTYPES)
MAX_AXES = 999  # NAXIS and TFIELDS are at most 999
#: Bytes skipped per read when walking past the data of a gzipped file.
SKIP_CHUNK = 1 << 22


def gzip_trailer_size(path: Path, size: int) -> int | None:
    """ISIZE, the last four bytes of a gzip file: its uncompressed length modulo 2**32 (RFC 1952,
    section 2.3.1; of the last member, when the file holds several). None for a file too short."""
    if size < 18:  # a 10-byte header and the 8-byte trailer
        return None
    with open(path, "rb") as fh:
        fh.seek(size - 4)
        return int.from_bytes(fh.read(4), "little")


def _check_structure(path: Path, stream, size: int | None, headers: list[bytes] | None = None,
                     gzip_size: int | None = None) -> int:
    """Walk the HDUs of an open FITS stream (plain: ``size`` its bytes; gzipped: ``size`` None, data
    read past in chunks) and check every header is well formed (BITPIX, NAXIS 0-999, NAXISn >= 0,
    PCOUNT >= 0, GCOUNT >= 1, TFIELDS 0-999, END) and every HDU's data is in the file, without
    reading the data into memory and before astropy parses anything; anything else after the last
    HDU than padding is refused too (a header whose sizes were edited). Returns the number of HDUs;
    each HDU's header bytes are appended to ``headers`` when given.

    A gzipped stream's data can only be passed by decompressing it (a 100 MB Gaia XP table: 0.6 s,
    and a reader decompresses it again). ``gzip_size`` (the file's trailer,
    :func:`gzip_trailer_size`) saves that: when an HDU's data would end exactly where the trailer
    says the decompressed file ends, that HDU is the last and complete, and the walk stops there.
    A cut-short gzip file has no trailer (its last bytes are compressed data: the chance they name
    this exact length is 2**-32), so it is walked to the end and refused with the reason as before;
    a file damaged inside is refused when its reader decompresses it. Files of 4 GiB or more
    decompressed (ISIZE is the length modulo 2**32) are always walked to the end."""
    position, n_hdus = 0, 0
    while True:
        first = stream.read(BLOCK)
        if not first or (n_hdus and not first.strip(b"\0 ")):  # the end, or zero/blank padding
            return n_hdus
        where = f"HDU {n_hdus} (byte {position})"
        if n_hdus and not first.startswith(b"XTENSION="):
            raise SpectrumReadError(path, f"no FITS header where {where} should start: the sizes in a header "
                                          "before it are wrong, or the file is damaged")
        if len(first) < BLOCK:
            raise SpectrumReadError(path, f"truncated FITS file: the header of {where} is cut short")
        cards, header_bytes = _header_cards(path, stream, first, where, headers)
        data_bytes = _data_bytes(path, cards, where, primary=n_hdus == 0)
        padded = -(-data_bytes // BLOCK) * BLOCK
        position += header_bytes
        if size is not None:
            if position + data_bytes > size:
                raise SpectrumReadError(path, f"truncated FITS file: headers announce {position + data_bytes} bytes, "
                                              f"file has {size}")
            stream.seek(position + padded)
        elif gzip_size is not None and position + padded == gzip_size:  # (below 4 GiB: ISIZE is modulo 2**32)
            return n_hdus + 1  # the trailer: this HDU's data ends the file
        else:
            left = padded
            while left > 0:
                chunk = stream.read(min(left, SKIP_CHUNK))
                if not chunk:
                    if padded - left < data_bytes:
                        raise SpectrumReadError(
                            path, f"truncated FITS file: headers announce {position + data_bytes} bytes, "
                                  f"decompressed file has {position + padded - left}")
                    break
                left -= len(chunk)
        position += padded
        n_hdus += 1


def _header_cards(path: Path, stream, block: bytes, where: str,
                  headers: list[bytes] | None = None) -> tuple[dict[str, str], int]:
    """The cards of the header starting with ``block`` (keyword -> value text), and its size in bytes
    (the header's bytes appended to ``headers`` when given)."""
    cards: dict[str, str] = {}
    n_bytes = 0
    blocks = []
    while True:
        n_bytes += BLOCK
        blocks.append(block)
        for i in range(0, BLOCK, CARD):
            card = block[i:i + CARD]
            keyword = card[:8].decode("ascii", "replace").strip()
            if keyword == "END":
                if headers is not None:
                    headers.append(b"".join(blocks))
                return cards, n_bytes
            if card[8:10] == b"= " and keyword not in cards:
                cards[keyword] = card[10:].decode("ascii", "replace").split("/")[0].strip()
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            raise SpectrumReadError(path, f"truncated FITS file: the header of {where} has no END card")


def _integer(path: Path, cards: dict[str, str], keyword: str, where: str, default: int | None = None,
             low: int = 0, high: int | None = None) -> int:
    text = cards.get(keyword)
    if text is None and default is not None:
        return default
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise SpectrumReadError(path, f"{where}: {keyword} = {text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        allowed = f"{low}-{high}" if high is not None else f">= {low}"
        raise SpectrumReadError(path, f"{where}: {keyword} = {value} is out of range ({allowed})")
    return value


def _data_bytes(path: Path, cards: dict[str, str], where: str, primary: bool) -> int:
    """Bytes of data a header announces: |BITPIX| / 8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn)."""
    bitpix = _integer(path, cards, "BITPIX", where, low=-64, high=64)
    if bitpix not in BITPIX_VALUES:
        raise SpectrumReadError(path, f"{where}: BITPIX = {bitpix} is not one of {BITPIX_VALUES}")
    naxis = _integer(path, cards, "NAXIS", where, high=MAX_AXES)
    axes = [_integer(path, cards, f"NAXIS{k}", where) for k in range(1, naxis + 1)]
    pcount = _integer(path, cards, "PCOUNT", where, default=0)
    gcount = _integer(path, cards, "GCOUNT", where, default=1, low=1)
    if "TFIELDS" in cards:
        _integer(path, cards, "TFIELDS", where, high=MAX_AXES)
    return data_size(bitpix, axes, pcount, gcount)


def _check_not_truncated(path: Path, size: int | None, gzip_size: int | None = None) -> list[bytes]:
    """Check the FITS structure of ``path`` (:func:`_check_structure`); ``size`` None: gzipped
    (``gzip_size``: its trailer's length). Returns each HDU's header bytes."""
    headers: list[bytes] = []
    try:
        with (open(path, "rb") if size is not None else gzip.open(path, "rb")) as stream:
            n_hdus = _check_structure(path, stream, size, headers, gzip_size)
    except SpectrumReadError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise SpectrumReadError(path, f"corrupt or truncated file ({type(exc).__name__}: {exc})") from exc
    if n_hdus == 0:
        raise SpectrumReadError(path, "FITS file without a single complete HDU header")
    return headers
