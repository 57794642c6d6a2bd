"""A registry of spectrum readers, in the spirit of astropy's unified I/O registry.

Each reader registers a *name* (the survey product, also the ``product`` of the records it
makes), an ``identify`` function that looks at a file's **content** (FITS header keywords, HDU
layout), and a ``read`` function that returns :class:`~stellarfield.spectrum.Spectrum`
records. Some products spread one observation over several files (GALAH's four CCD files): such a
reader also gives a ``unit_key`` so that ingest reads the group once. Each reader declares the
:class:`~stellarfield.io.profile.ProductProfile` of every product it emits; the registry collects them
(:func:`product_profile`, :func:`profiles`).

>>> from stellarfield.io import read_spectra, identify_format
>>> identify_format("apStar-r6-2M00452143+1634446.fits")          # doctest: +SKIP
'apogee_apstar'
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from stellarfield.io.errors import SpectrumReadError, UnknownFormatError
from stellarfield.io.peek import FilePeek, peek_file
from stellarfield.io.profile import ProductProfile
from stellarfield.paths import real_path
from stellarfield.spectrum import Spectrum


@dataclass(frozen=True)
class Reader:
    """A registered reader.

    name:
        Product name, e.g. ``"apogee_apstar"``; records it reads carry ``product == name``
        (a reader may also emit further products).
    identify:
        ``identify(peek) -> bool`` from the file's content (see :class:`~stellarfield.io.peek.FilePeek`).
    read:
        ``read(path) -> list[Spectrum]``.
    unit_key:
        ``unit_key(path) -> str``: files with the same key are one observation, read once.
    description:
        What the reader expects, used in error messages for unknown files.
    profiles:
        The :class:`~stellarfield.io.profile.ProductProfile` of each product the reader emits (the
        first is ``name``'s).
    """

    name: str
    identify: Callable[[FilePeek], bool]
    read: Callable[[Path], list[Spectrum]]
    description: str
    profiles: tuple[ProductProfile, ...]
    unit_key: Callable[[Path], str] | None = None
    #: ``read_rows(path, rows=None) -> GridRows``: the same records as ``read`` as columns, for a
    #: table of records on one grid (:func:`read_rows`); ``rows`` (a slice of the table's rows)
    #: gives the records of those rows a whole read gives. None where the reader has no such path.
    read_rows: Callable[..., object] | None = None
    #: ``count_rows(peek) -> int``: the table's rows, from its headers (with ``read_rows``), so that
    #: ingest can read a large table in blocks side by side.
    count_rows: Callable[[FilePeek], int] | None = None

    @property
    def products(self) -> tuple[str, ...]:
        """The products the reader emits."""
        return tuple(p.product for p in self.profiles)


_READERS: dict[str, Reader] = {}
_PROFILES: dict[str, ProductProfile] = {}
_AUXILIARY: dict[str, Callable[[FilePeek], bool]] = {}


def register_auxiliary(name: str, identify: Callable[[FilePeek], bool]) -> None:
    """Register a kind of file that travels with spectra but is not one (label tables, docs)."""
    _AUXILIARY[name] = identify


def auxiliary_kind(path: str | Path) -> str | None:
    """Name of the auxiliary kind of ``path`` (a label table, a README...), or None.

    Text files (by content and ending) are always auxiliary. Never raises for a readable file.
    """
    _ensure_loaded()
    try:
        peek = peek_file(path)
    except SpectrumReadError:
        return None
    try:
        return _auxiliary_kind(peek)
    finally:
        peek.close()


def _auxiliary_kind(peek: FilePeek) -> str | None:
    if peek.kind == "text":
        return "text"
    with _quiet():
        for name, identify in _AUXILIARY.items():
            try:
                if identify(peek):
                    return name
            except Exception:
                continue
    return None


def classify(path: str | Path) -> tuple[str, str]:
    """``("auxiliary", kind)`` or ``("spectrum", format)`` from one look at the file.

    Raises :class:`SpectrumReadError` (or :class:`UnknownFormatError`) naming the file and why it
    is neither.
    """
    kind, what, _ = classify_peek(path)
    return kind, what


def classify_peek(path: str | Path) -> tuple[str, str, FilePeek]:
    """:func:`classify`, and the peek it was made from, for reading the file without a second look.

    For a spectrum, the header check :func:`read_spectra` makes before reading
    (:func:`check_header_units` for the identified format) is made here too, on the headers the
    identification parsed, and its outcome kept on the peek (and a table's row count, from a
    reader's ``count_rows``, as ``peek.n_rows``); the peek returned is
    :meth:`~stellarfield.io.peek.FilePeek.compact` (no headers, only the outcomes), to be given to
    ``read_spectra(path, format, peek=peek)``, in this process or another. Raises as :func:`classify`.
    """
    _ensure_loaded()
    path = Path(path)
    peek = peek_file(path)
    try:
        aux = _auxiliary_kind(peek)
        if aux is not None:
            return "auxiliary", aux, peek.compact()
        name = _identify(path, peek)
        try:
            check_header_units(path, peek, _READERS[name].profiles[0])  # its outcome is kept on the peek
        except Exception:  # reported when the file is read, as read_spectra always did
            pass
        compact = peek.compact()
        if _READERS[name].count_rows is not None:
            try:
                with _quiet():
                    compact.n_rows = int(_READERS[name].count_rows(peek))
            except Exception:  # the read says what is wrong
                pass
        return "spectrum", name, compact
    finally:
        peek.close()


def register_reader(
    name: str,
    *,
    identify: Callable[[FilePeek], bool],
    description: str,
    profiles: tuple[ProductProfile, ...] | ProductProfile,
    unit_key: Callable[[Path], str] | None = None,
) -> Callable[[Callable[[Path], list[Spectrum]]], Callable[[Path], list[Spectrum]]]:
    """Decorator registering ``read(path) -> list[Spectrum]`` under ``name``, with the profile(s) of
    the products it emits (``name``'s first)."""
    profiles = (profiles,) if isinstance(profiles, ProductProfile) else tuple(profiles)
    if not profiles or profiles[0].product != name:
        raise ValueError(f"reader {name!r}: its first profile must be the profile of {name!r}")

    def decorator(read: Callable[[Path], list[Spectrum]]):
        if name in _READERS:
            raise ValueError(f"a reader named {name!r} is already registered")
        clash = [p.product for p in profiles if p.product in _PROFILES]
        if clash:
            raise ValueError(f"products {clash} already have a profile")
        _READERS[name] = Reader(name, identify, read, description, profiles, unit_key)
        _PROFILES.update((p.product, p) for p in profiles)
        return read

    return decorator


def register_rows_reader(name: str, *, count_rows: Callable[[FilePeek], int] | None = None
                         ) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Decorator registering ``read_rows(path, rows=None) -> GridRows`` for the reader ``name``
    (registered first): the records ``read(path)`` gives, as columns
    (:class:`~stellarfield.data.store.GridRows`), which ingest writes without making one
    :class:`Spectrum` per row; ``rows`` (a slice) reads the records of those rows of the table.
    ``count_rows(peek)``: the number of rows, from the headers (ingest then reads blocks of rows
    side by side)."""

    def decorator(read_rows: Callable[..., object]):
        from dataclasses import replace

        _READERS[name] = replace(_READERS[name], read_rows=read_rows, count_rows=count_rows)
        return read_rows

    return decorator


def readers() -> dict[str, Reader]:
    """All registered readers by name."""
    _ensure_loaded()
    return dict(_READERS)


def get_reader(name: str) -> Reader:
    _ensure_loaded()
    try:
        return _READERS[name]
    except KeyError:
        raise KeyError(f"no reader named {name!r}; known: {sorted(_READERS)}") from None


def identify_format(path: str | Path) -> str:
    """Name of the one reader that recognises ``path``'s content.

    Raises :class:`UnknownFormatError` (naming the file and what was expected) when none does,
    and :class:`SpectrumReadError` when the file cannot be opened at all.
    """
    _ensure_loaded()
    path = Path(path)
    peek = peek_file(path)  # raises SpectrumReadError with a clear reason
    try:
        return _identify(path, peek)
    finally:
        peek.close()


def _identify(path: Path, peek: FilePeek) -> str:
    with _quiet():
        matches = [r.name for r in _READERS.values() if _safe_identify(r, peek)]
    if not matches:
        expected = "; ".join(f"{r.name}: {r.description}" for r in _READERS.values())
        raise UnknownFormatError(path, f"not a spectrum format stellarfield knows. Expected one of: {expected}")
    if len(matches) > 1:
        raise UnknownFormatError(path, f"ambiguous format: matches readers {matches}; pass format=")
    return matches[0]


def _safe_identify(reader: Reader, peek: FilePeek) -> bool:
    """Whether ``reader`` takes the file (False when its identify raises); call under :func:`_quiet`."""
    try:
        return bool(reader.identify(peek))
    except Exception:
        return False


@contextlib.contextmanager
def _reading(path: Path, reader_name: str) -> Iterator[None]:
    """A reader at work on ``path``, quietly: whatever it raises becomes a :class:`SpectrumReadError`
    naming the file (a reader bug or an odd file; running out of memory: a header declaring too much)."""
    try:
        with _quiet():
            yield
    except SpectrumReadError:
        raise
    except MemoryError as exc:
        raise SpectrumReadError(path, f"{reader_name} reader ran out of memory (a header that declares too much data?)") from exc
    except Exception as exc:  # a reader bug or an odd file: still name the file
        raise SpectrumReadError(path, f"{reader_name} reader failed: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings from astropy or numpy about a damaged file (non-ASCII header cards, overflows):
    the checks and the readers say in one line what is wrong, or the file is read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_spectra(path: str | Path, format: str | None = None, *, peek: FilePeek | None = None) -> list[Spectrum]:
    """Read every spectrum in ``path`` (format detected from content unless given).

    The file is checked before it is read (:func:`~stellarfield.io.peek.peek_file`: it exists, is
    FITS, holds all the data its headers declare, so nothing is allocated for pixels that are not
    there; the header units its product's profile names) and every record after
    (:func:`check_record`: wavelengths within the product's known range).

    ``peek``: the file's peek when it was already made (:func:`classify_peek`), so that the file is
    not looked at twice; checks whose outcome the peek holds are not made again.

    Raises :class:`SpectrumReadError` naming the file and the reason for any failure.
    """
    _ensure_loaded()
    path = Path(path)
    if peek is None:
        peek = peek_file(path)  # raises SpectrumReadError with a clear reason
    elif Path(peek.path) != path:
        raise ValueError(f"read_spectra: the peek given is of {peek.path}, not of {path}")
    try:
        name = format or _identify(path, peek)
        if name not in _READERS:
            raise UnknownFormatError(path, f"no reader named {name!r}; known: {sorted(_READERS)}")
        reader = _READERS[name]
        check_header_units(path, peek, reader.profiles[0])
    finally:
        peek.close()
    with _reading(path, name):
        records = list(reader.read(path))
    for record in records:
        check_record(path, record)
    return records


def read_rows(path: str | Path, format: str, *, peek: FilePeek | None = None, rows: slice | None = None):
    """:func:`read_spectra` for a reader with a columnar path (``Reader.read_rows``): the same
    checks before reading (the peek, the header units) and after (the product's wavelength range,
    checked once for the grid all rows share), the same errors; returns the reader's
    :class:`~stellarfield.data.store.GridRows` (of the table's rows ``rows`` only, when given).
    Raises ``ValueError`` for a reader without one."""
    _ensure_loaded()
    path = Path(path)
    reader = get_reader(format)
    if reader.read_rows is None:
        raise ValueError(f"reader {format!r} has no columnar path (read_rows)")
    if peek is None:
        peek = peek_file(path)
    elif Path(peek.path) != path:
        raise ValueError(f"read_rows: the peek given is of {peek.path}, not of {path}")
    try:
        check_header_units(path, peek, reader.profiles[0])
    finally:
        peek.close()
    with _reading(path, format):
        table = reader.read_rows(path, rows)
    if len(table):
        _check_product_wavelengths(path, table.keys[0], table.product, table.wavelength)
    return table


def check_header_units(path: Path, peek: FilePeek, profile: ProductProfile) -> None:
    """Refuse a file whose headers give another unit than its product's (:class:`~stellarfield.io.profile.HeaderUnit`):
    e.g. an apStar whose HDU 1 is not the flux (``BUNIT``), a wavelength axis not in Angstrom.

    The outcome is kept on ``peek`` (per product): a second check of the same peek, or of its
    :meth:`~stellarfield.io.peek.FilePeek.compact` copy, gives it without reading a header."""
    verdict = ("header_units", profile.product)
    if verdict in peek._verdicts:
        reason = peek._verdicts[verdict]
        if reason is not None:
            raise SpectrumReadError(path, reason)
        return
    try:
        _check_header_units(path, peek, profile)
    except SpectrumReadError as exc:
        peek._verdicts[verdict] = exc.reason
        raise
    peek._verdicts[verdict] = None


def _check_header_units(path: Path, peek: FilePeek, profile: ProductProfile) -> None:
    for unit in profile.header_units:
        try:
            with _quiet():
                header = peek.header(unit.hdu)
                if header is None or unit.keyword not in header:
                    continue
                value = str(header[unit.keyword]).strip()
        except Exception as exc:  # an unparsable card (astropy's VerifyError)
            raise SpectrumReadError(path, f"HDU {unit.hdu} {unit.keyword} card cannot be read ({type(exc).__name__}: "
                                          f"{' '.join(str(exc).split())})") from exc
        if not value.lower().startswith(unit.prefix.lower()):
            raise SpectrumReadError(
                path, f"HDU {unit.hdu} {unit.keyword} is {value!r} where a {profile.title} file has "
                      f"{unit.prefix!r}...: a missing or reordered HDU, or another unit")


def check_record(path: Path, record: Spectrum) -> None:
    """Refuse a record its product's profile rules out: no profile, or wavelengths outside the known
    range (:meth:`~stellarfield.io.profile.ProductProfile.wavelength_problem`: a WCS in nm or micron)."""
    _check_product_wavelengths(path, record.key, record.product, record.wavelength)


def _check_product_wavelengths(path: Path, key: str, product: str, wavelength) -> None:
    profile = _PROFILES.get(product)
    if profile is None:
        raise SpectrumReadError(path, f"record {key} is of product {product!r}, which no reader declares")
    problem = profile.wavelength_problem(wavelength)
    if problem is not None:
        raise SpectrumReadError(path, f"{key}: {problem}")


def unit_key(path: str | Path, format: str) -> str:
    """Key grouping files that form one observation (the path itself for most formats)."""
    reader = get_reader(format)
    path = Path(path)
    return reader.unit_key(path) if reader.unit_key else str(real_path(path))


def _ensure_loaded() -> None:
    # Importing the readers package registers every built-in reader.
    import stellarfield.io.readers  # noqa: F401


def products() -> Iterable[str]:
    _ensure_loaded()
    for r in _READERS.values():
        yield from r.products


def profiles() -> dict[str, ProductProfile]:
    """The :class:`~stellarfield.io.profile.ProductProfile` of every registered product, by product."""
    _ensure_loaded()
    return dict(_PROFILES)


def product_profile(product: str) -> ProductProfile | None:
    """The profile of ``product``, or None for a product no reader emits (a custom grid, synthetic
    test products): callers then fall back on what the records themselves say."""
    _ensure_loaded()
    return _PROFILES.get(product)
