"""FITS headers and primary images read without astropy, for the thousands of small files of a library.

A MILES or STELIB star is one file holding a 1-D image and a header of 10-60 plain cards. astropy's
``fits.open`` spends about 1 ms on such a file (mostly building and verifying ``Card`` objects), 40
times what reading its bytes costs; identifying the file and then reading it parsed every header
twice. This module parses what such files hold, by the FITS Standard 4.0 (Pence et al. 2010, A&A
524, A42; sections 4.1-4.2 for cards and values, 5.2 for image data), and *declines* anything else,
so that the caller falls back to astropy:

* :func:`parse_header` turns a header's bytes into a :class:`CardHeader` (keyword -> value, with
  the comments), or None when a card is beyond plain ``KEYWORD = value / comment`` cards
  (``CONTINUE`` long strings, ``HIERARCH``, complex values, an undefined value, any value it cannot
  read but one: integers separated by blanks, which raise when asked for, as in astropy);
* :func:`read_primary_image` reads HDU 0 as ``(CardHeader, ndarray)``, or None unless its data are
  a plain image (no ``BSCALE``/``BZERO``/``BLANK``, no random groups);
* :func:`read_binary_table` reads a binary table HDU as a numpy structured array, or None unless
  its columns are plain numbers and strings.

Values are what astropy gives for the same cards (checked card by card on every real file in
``tests/test_io_fits_cards.py``): strings without trailing blanks (``''`` is one quote), ``T`` and
``F`` as bool, integers as int, reals as float (``D`` exponents too). A keyword that appears twice
gives its first value, as ``astropy.io.fits.Header`` does. Commentary cards (``COMMENT``,
``HISTORY``, blank) carry no value and are not kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np


#: FITS structure (FITS Standard 4.0, sections 3.1 and 4.1): 2880-byte blocks of 36 80-byte cards.
BLOCK = 2880
CARD = 80
#: Data types of BITPIX values (section 4.4.1.1): big-endian integers and IEEE floats.
BITPIX_DTYPES = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
                 -32: np.dtype(">f4"), -64: np.dtype(">f8")}
#: Cards without a value (section 4.4.2.4): they are passed over.
COMMENTARY = {"COMMENT", "HISTORY", ""}
#: Keywords whose cards follow other rules than ``KEYWORD = value``: the header is declined.
UNSUPPORTED = {"CONTINUE", "HIERARCH"}
#: Keywords that make an image's stored numbers differ from its values (section 4.4.2.5): declined.
SCALING = ("BSCALE", "BZERO", "BLANK")

_INTEGER = re.compile(r"[+-]?\d+")
_REAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?")
_STRING = re.compile(r"'((?:[^']|'')*)'\s*(/.*)?", re.DOTALL)
#: Integers separated by blanks (``APNUM1  =    1 0`` in the STELIB files): not a FITS value, and
#: astropy raises on it too; every other value this module cannot read goes to astropy.
_INTEGERS = re.compile(r"\d+(\s+\d+)+")


class UnparsableCardError(ValueError):
    """A card whose value is not a FITS value (``APNUM1  =    1 0`` in the STELIB files), asked for
    by keyword: astropy raises its ``VerifyError`` there too."""


class CardHeader(Mapping):
    """A parsed FITS header: ``header["CRVAL1"]``, ``header.get("FWHM")``, ``"RA" in header`` and
    ``header.comments["RA"]`` as with :class:`astropy.io.fits.Header` (keywords case-insensitive).
    A card whose value is not a FITS value is in the header, and asking for its value raises
    :class:`UnparsableCardError`, as astropy does (``get`` too)."""

    def __init__(self, values: dict[str, object], comments: dict[str, str], invalid: dict[str, str] | None = None):
        self._values = values
        self._invalid = invalid or {}
        self.comments = _Comments(comments)

    def __getitem__(self, keyword: str):
        keyword = keyword.upper()
        if keyword in self._invalid:
            raise UnparsableCardError(f"the {keyword} card's value is not a FITS value: {self._invalid[keyword]!r}")
        return self._values[keyword]

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and (keyword.upper() in self._values or keyword.upper() in self._invalid)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._values, *self._invalid])

    def __len__(self) -> int:
        return len(self._values) + len(self._invalid)

    def __repr__(self) -> str:
        return f"CardHeader({self._values!r})"


class _Comments:
    """``header.comments[keyword]``: the card's comment ('' when it has none)."""

    def __init__(self, comments: dict[str, str]):
        self._comments = comments

    def __getitem__(self, keyword: str) -> str:
        return self._comments[keyword.upper()]


def parse_header(raw: bytes) -> CardHeader | None:
    """The header whose cards are ``raw`` (up to and including END), or None when a card is not a
    plain ``KEYWORD = value / comment`` card this module reads (see the module docstring)."""
    values: dict[str, object] = {}
    comments: dict[str, str] = {}
    invalid: dict[str, str] = {}  # keyword -> a value field that is not a FITS value
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:  # a header is ASCII text (section 4.1.1): astropy says what is wrong
        return None
    if not text.isprintable():  # tabs, control characters: not FITS text; astropy says what it makes of them
        return None
    for start in range(0, len(text) - CARD + 1, CARD):
        card = text[start:start + CARD]
        keyword = card[:8].rstrip().upper()  # astropy reads a lower-case keyword as upper case
        if keyword[:1] == " ":
            return None  # not left-justified (section 4.1.2.1): astropy reads it all the same
        if keyword == "END":
            return CardHeader(values, comments, invalid)
        if keyword in UNSUPPORTED or card.startswith("HIERARCH"):
            return None
        if keyword in COMMENTARY:  # text from column 9 on, even after "= " (STELIB's HISTORY cards)
            continue
        if card[8:10] != "= ":
            return None  # a keyword without a value indicator that is not commentary
        if keyword in values or keyword in invalid:
            continue  # the first card of a keyword is the one read
        parsed = parse_value(card[10:])
        if parsed is not None:
            values[keyword], comments[keyword] = parsed
        elif _INTEGERS.fullmatch(card[10:].partition("/")[0].strip()):
            invalid[keyword] = card[10:].strip()  # astropy cannot read it either
        else:
            return None  # undefined, complex, or a value astropy may still make sense of ('Barnard's star')
    return None  # no END card


def parse_value(field: str) -> tuple[object, str] | None:
    """``(value, comment)`` of a card's value field (columns 11-80), or None for a value this
    module does not read (undefined, complex, or not a FITS value)."""
    stripped = field.lstrip()
    if stripped.startswith("'"):
        return _string_value(stripped)
    value_text, _, comment = field.partition("/")
    value_text = value_text.strip()
    if value_text in ("T", "F"):
        value: object = value_text == "T"
    elif _INTEGER.fullmatch(value_text):
        value = int(value_text)
    elif _REAL.fullmatch(value_text):
        value = float(value_text.replace("D", "E").replace("d", "e"))
    else:
        return None
    return value, comment.strip()


def _string_value(text: str) -> tuple[str, str] | None:
    """A quoted string starting ``text`` (``''`` inside is one quote; trailing blanks are not
    significant, section 4.2.1.1) and the comment after it; None when the quote is not closed or
    something other than a comment follows it."""
    match = _STRING.fullmatch(text)
    if match is None:
        return None
    return match[1].replace("''", "'").rstrip(), (match[2] or "/")[1:].strip()


def read_primary_image(path: str | Path) -> tuple[CardHeader, np.ndarray] | None:
    """``(header, data)`` of HDU 0 of a FITS file (plain, or gzipped and decompressed in memory)
    holding a plain image (data in the file's big-endian type, shape ``(NAXISn, ..., NAXIS1)``), or
    None when this module does not read it: another header (:func:`parse_header`), scaled or
    blank-flagged data, random groups, no data, fewer bytes than the header announces. The caller
    then uses astropy, which says what is wrong if anything is."""
    raw = _fits_bytes(Path(path))
    hdu = _hdu(raw, 0) if raw is not None else None
    if hdu is None:
        return None
    header, start, n_bytes = hdu
    dtype = BITPIX_DTYPES[header["BITPIX"]]
    if header.get("SIMPLE") is not True or any(key in header for key in SCALING) or header.get("GROUPS") is True:
        return None
    shape = [header[f"NAXIS{k}"] for k in range(header["NAXIS"], 0, -1)]
    if not shape or n_bytes == 0:
        return None
    return header, np.frombuffer(raw, dtype=dtype, count=n_bytes // dtype.itemsize, offset=start).reshape(shape)


def read_binary_table(path: str | Path, index: int) -> tuple[CardHeader, np.ndarray] | None:
    """``(header, rows)`` of the binary table in HDU ``index`` (section 7.3) of a FITS file (plain,
    or gzipped and decompressed in memory), the rows a numpy structured array over the file's bytes
    (fields named by ``TTYPEn``, in the file's big-endian types, ``A`` columns as bytes; a column of
    ``r`` values has shape ``(n_rows, r)``), or None when this module does not read it: a header
    :func:`parse_header` declines, a column of another type than ``A``, ``B``, ``I``, ``J``, ``K``,
    ``E``, ``D`` (bits, logicals, complex, variable-length arrays), scaled (``TSCALn``/``TZEROn``)
    or multi-dimensional (``TDIMn``) columns, a heap, column names that are not distinct, or a file
    shorter than its headers say. The caller then uses astropy."""
    raw = _fits_bytes(Path(path))
    hdu = _hdu(raw, index) if raw is not None else None
    if hdu is None:
        return None
    header, start, _ = hdu
    rows = _table_dtype(header)
    if rows is None:
        return None
    return header, np.frombuffer(raw, dtype=rows, count=header["NAXIS2"], offset=start)


def _fits_bytes(path: Path) -> bytes | None:
    """The bytes of the FITS file ``path``, a gzipped one decompressed
    (:func:`~stellarfield.io.fits_utils.gunzip_in_memory`; None above its limit)."""
    from stellarfield.io.fits_utils import gunzip_in_memory, is_gzipped

    return gunzip_in_memory(path) if is_gzipped(path) else path.read_bytes()


def _hdu(raw: bytes, index: int) -> tuple[CardHeader, int, int] | None:
    """``(header, data offset, data bytes)`` of HDU ``index`` of the FITS file ``raw``, or None when
    a header on the way is declined (:func:`parse_header`), announces sizes that are not integers,
    or its data are not all in ``raw``."""
    position = 0
    for hdu in range(index + 1):
        end = _header_end(raw, position)
        header = parse_header(raw[position:end]) if end is not None else None
        n_bytes = _data_bytes(header) if header is not None else None
        if n_bytes is None:
            return None
        position = -(-end // BLOCK) * BLOCK
        if position + n_bytes > len(raw):
            return None
        if hdu < index:
            position += -(-n_bytes // BLOCK) * BLOCK
    return header, position, n_bytes


#: Binary-table column types read here (section 7.3.3.1, Table 18) and their numpy types.
TFORM_DTYPES = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}
_TFORM = re.compile(r"(\d*)([ABIJKED])")


def _table_dtype(header: CardHeader) -> np.dtype | None:
    """The numpy type of one row of a plain binary table (see :func:`read_binary_table`), or None."""
    if header.get("XTENSION") != "BINTABLE" or header.get("BITPIX") != 8 or header.get("NAXIS") != 2:
        return None
    if header.get("PCOUNT", 0) != 0 or header.get("GCOUNT", 1) != 1:
        return None
    n_fields = header.get("TFIELDS")
    if not isinstance(n_fields, int) or not 0 < n_fields <= 999:
        return None
    names, formats = [], []
    for k in range(1, n_fields + 1):
        form, name = header.get(f"TFORM{k}"), header.get(f"TTYPE{k}")
        match = _TFORM.fullmatch(form.strip()) if isinstance(form, str) else None
        if match is None or not isinstance(name, str) or f"TSCAL{k}" in header or f"TZERO{k}" in header:
            return None
        repeat = int(match.group(1) or 1)
        tdim = header.get(f"TDIM{k}")
        if repeat < 1 or (tdim is not None and str(tdim).replace(" ", "") != f"({repeat})"):
            return None
        if match.group(2) == "A":
            formats.append(f"S{repeat}")
        else:
            formats.append((TFORM_DTYPES[match.group(2)], (repeat,)) if repeat > 1 else TFORM_DTYPES[match.group(2)])
        names.append(name.strip())
    if len({name.lower() for name in names}) != len(names) or not all(names):
        return None
    dtype = np.dtype({"names": names, "formats": formats})
    return dtype if dtype.itemsize == header.get("NAXIS1") else None


def data_size(bitpix: int, axes: list[int], pcount: int = 0, gcount: int = 1) -> int:
    """Bytes of data a header announces (section 4.4.1.1): |BITPIX| / 8 * GCOUNT * (PCOUNT +
    NAXIS1 * ... * NAXISn), 0 without axes."""
    if not axes:
        return 0
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(axes))


def _data_bytes(header: CardHeader) -> int | None:
    """:func:`data_size` of ``header``, or None when its sizes are not integers that say so."""
    bitpix, naxis = header.get("BITPIX"), header.get("NAXIS")
    if bitpix not in BITPIX_DTYPES or not isinstance(naxis, int) or not 0 <= naxis <= 999:
        return None
    axes = [header.get(f"NAXIS{k}") for k in range(1, naxis + 1)]
    pcount, gcount = header.get("PCOUNT", 0), header.get("GCOUNT", 1)
    if not all(isinstance(n, int) and n >= 0 for n in [*axes, pcount, gcount]):
        return None
    return data_size(bitpix, axes, pcount, gcount)


def _header_end(raw: bytes, start: int = 0) -> int | None:
    """Offset just past the END card of the header starting at ``raw[start]`` (None: no END card)."""
    for card in range(start, len(raw) - CARD + 1, CARD):
        if raw[card:card + 8] == b"END     ":
            return card + CARD
    return None
