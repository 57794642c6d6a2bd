"""Corrupted variants of real survey files, and the checks a reader's answer to each must pass.

:func:`variants` makes seeded mutations of one file's bytes (a gzipped file is decompressed, mutated
and compressed again, and also mutated as compressed bytes): truncation at a random offset, flipped
bytes (anywhere, or in a header), an edited header card (NAXIS*, BITPIX, BUNIT, CRVAL1, CDELT1,
CUNIT1, TFORM*, ... set to 0, negative, huge, scaled by 10 or 1e4, another unit), a removed or
duplicated HDU, and data set to NaN or infinity. :func:`read_case` feeds one variant to
:func:`stellarfield.io.read_spectra` under a time limit and an address-space limit and says what
went wrong, if anything.
"""

from __future__ import annotations

import gzip
import io
import resource
import signal
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Header keywords an edit picks from (those present in the file).
EDITED_KEYWORDS = ("NAXIS", "NAXIS1", "NAXIS2", "BITPIX", "BUNIT", "CRVAL1", "CDELT1", "CD1_1", "CRPIX1", "CUNIT1",
                   "TFIELDS", "TFORM1", "TFORM2", "TFORM3", "PCOUNT", "GCOUNT", "NWAVE", "NVISITS", "EXTEN0",
                   "XTENSION", "EXTNAME", "TTYPE1", "TTYPE2", "TDIM1", "TDIM2")
KINDS = ("truncate", "flip", "flip_header", "edit_card", "drop_hdu", "duplicate_hdu", "nan_data")
#: Seconds one read may take before the case counts as a hang.
CASE_TIMEOUT_S = 20
#: Address space one read may add before the case counts as a memory blow-up.
MEMORY_ALLOWANCE_BYTES = 3 * 2**30


@dataclass
class Variant:
    kind: str
    what: str
    data: bytes


def _hdu_spans(raw: bytes) -> list[tuple[int, int, int]]:
    """``(header_start, data_start, end)`` of each HDU of FITS bytes ``raw`` (as astropy walks them)."""
    from astropy.io import fits

    spans = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=True) as hdul:
            i = 0
            while True:
                try:
                    info = hdul[i].fileinfo()
                except (IndexError, OSError):
                    break
                spans.append((info["hdrLoc"], info["datLoc"], info["datLoc"] + info["datSpan"]))
                i += 1
    return spans


def _cards(raw: bytes, spans) -> list[tuple[int, str, str]]:
    """``(offset, keyword, value text)`` of the header cards of the keywords in :data:`EDITED_KEYWORDS`."""
    found = []
    for start, data_start, _ in spans:
        for i in range(start, data_start, 80):
            key = raw[i:i + 8].decode("ascii", "replace").strip()
            if key in EDITED_KEYWORDS:
                found.append((i, key, raw[i + 10:i + 80].decode("ascii", "replace").split("/")[0].strip()))
    return found


def _new_values(value: str, rng: np.random.Generator) -> str:
    """A replacement for a card's value: a wrong number, a scaled number, another string."""
    if value.startswith("'"):
        return str(rng.choice(["'Jy'", "''", "'nm'", "'um'", "'Err (10^-17 erg/s/cm^2/Ang)'", "'E'", "'1000000000E'",
                               "'0E'", "'X'", "'IMAGE'", "'BINTABLE'", "'flux_error'"]))
    try:
        number = float(value)
    except ValueError:
        return str(rng.choice(["0", "-1", "T", "'x'"]))
    if number == int(number) and "." not in value and "E" not in value.upper():
        n = int(number)
        return str(rng.choice([0, -1, 1, 2, 3, n + 1, n - 1, 2 * n, n // 2, -n, 2**31 - 1, 300_000_000, 64, -32, 7]))
    return repr(float(rng.choice([0.0, -number, number * 1e4, number / 1e4, number * 10, number / 10, 1e300, -1e-300])))


def _mutate(raw: bytes, kind: str, rng: np.random.Generator, spans, cards) -> Variant | None:
    if kind == "truncate":
        cut = int(rng.integers(1, len(raw)))
        return Variant(kind, f"cut at {cut} of {len(raw)} bytes", raw[:cut])
    if kind in ("flip", "flip_header"):
        out = bytearray(raw)
        n = int(rng.integers(1, 9))
        if kind == "flip_header":
            starts = [(s, d) for s, d, _ in spans]
            at = [int(rng.integers(*starts[int(rng.integers(len(starts)))])) for _ in range(n)]
        else:
            at = rng.integers(0, len(raw), n).tolist()
        for i in at:
            out[i] ^= int(rng.integers(1, 256))
        return Variant(kind, f"{n} byte(s) at {sorted(at)}", bytes(out))
    if kind == "edit_card":
        if not cards:
            return None
        offset, key, value = cards[int(rng.integers(len(cards)))]
        new = _new_values(value, rng)
        card = f"{key:<8}= {new:>20}".encode()[:80].ljust(80)
        return Variant(kind, f"{key} {value} -> {new} at {offset}", raw[:offset] + card + raw[offset + 80:])
    if kind in ("drop_hdu", "duplicate_hdu"):
        if len(spans) < 2:
            return None
        k = int(rng.integers(1, len(spans)))
        start, _, end = spans[k]
        if kind == "drop_hdu":
            return Variant(kind, f"HDU {k} removed", raw[:start] + raw[end:])
        return Variant(kind, f"HDU {k} repeated", raw[:end] + raw[start:end] + raw[end:])
    if kind == "nan_data":
        k = int(rng.integers(len(spans)))
        _, data_start, end = spans[k]
        if end - data_start < 8:
            return None
        out = bytearray(raw)
        lo = int(rng.integers(data_start, end - 4)) // 4 * 4
        hi = min(end, lo + 4 * int(rng.integers(1, 200)))
        pattern = bytes.fromhex(str(rng.choice(["7fc00000", "7f800000", "ff800000", "ffffffff"])))
        out[lo:hi] = (pattern * ((hi - lo) // 4 + 1))[: hi - lo]
        return Variant(kind, f"HDU {k} bytes {lo}-{hi} set to {pattern.hex()}", bytes(out))
    raise ValueError(kind)


def variants(source: Path, n: int, seed: int) -> list[Variant]:
    """``n`` seeded corrupted variants of the file ``source`` (kinds drawn in turn from :data:`KINDS`)."""
    rng = np.random.default_rng(seed)
    packed = source.read_bytes()
    gz = packed[:2] == b"\x1f\x8b"
    raw = gzip.decompress(packed) if gz else packed
    spans = _hdu_spans(raw)
    cards = _cards(raw, spans)
    out: list[Variant] = []
    attempts = 0
    while len(out) < n and attempts < 10 * n:
        kind = KINDS[attempts % len(KINDS)]
        attempts += 1
        if gz and kind in ("truncate", "flip") and rng.random() < 0.5:  # the compressed bytes themselves
            v = _mutate(packed, kind, rng, [], [])
            v.kind += "_gzip"
        else:
            v = _mutate(raw, kind, rng, spans, cards)
            if v is not None and gz:
                v.data = gzip.compress(v.data, compresslevel=1)
        if v is not None:
            out.append(v)
    return out


class CaseTimeout(BaseException):  # not an Exception: no reader may swallow it
    pass


@contextmanager
def limits(seconds: int = CASE_TIMEOUT_S, memory_bytes: int = MEMORY_ALLOWANCE_BYTES):
    """Raise :class:`CaseTimeout` after ``seconds``; refuse allocations beyond ``memory_bytes`` more
    address space than the process holds now (MemoryError)."""
    def on_alarm(signum, frame):
        raise CaseTimeout(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        vm_bytes = int(fh.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm_bytes + memory_bytes, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def record_problem(spectrum) -> str | None:
    """What is wrong with a record a reader returned (None: nothing)."""
    for seg in spectrum.segments:
        good = seg.mask
        if not np.isfinite(seg.flux[good]).all():
            return f"{spectrum.key} {seg.name}: non-finite flux at good pixels"
        if not (np.isfinite(seg.ivar).all() and (seg.ivar >= 0).all()):
            return f"{spectrum.key} {seg.name}: non-finite or negative ivar"
        if not np.isfinite(seg.wavelength).all():
            return f"{spectrum.key} {seg.name}: non-finite wavelength"
        if seg.lsf_fwhm is not None and not (np.isfinite(seg.lsf_fwhm[good]).all() and (seg.lsf_fwhm[good] > 0).all()):
            return f"{spectrum.key} {seg.name}: non-finite or non-positive LSF width at good pixels"
    if not spectrum.mask.any():
        return f"{spectrum.key}: returned with no good pixel"
    return None


def read_case(path: Path, fmt: str | None = None) -> tuple[str, str]:
    """``(outcome, detail)`` of reading ``path``: ``("ok", n records)``, ``("refused", message)`` for
    a one-line StellarfieldError naming the file, or a failure: ``"bad_record"``, ``"exception"``
    (anything else escaped), ``"bad_message"``, ``"hang"``, ``"memory"``."""
    from stellarfield.errors import StellarfieldError
    from stellarfield.io import read_spectra

    try:
        with limits():
            records = read_spectra(path, format=fmt)
    except CaseTimeout as exc:
        return "hang", str(exc)
    except MemoryError as exc:
        return "memory", f"MemoryError {exc}"
    except StellarfieldError as exc:
        message = str(exc)
        if "out of memory" in message:
            return "memory", message
        if "\n" in message or not message.startswith(str(path)):
            return "bad_message", message
        return "refused", message
    except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
        return "exception", f"{type(exc).__name__}: {exc}"
    for s in records:
        problem = record_problem(s)
        if problem:
            return "bad_record", problem
    return "ok", f"{len(records)} record(s)"


def write_case(fmt: str, source: Path, variant: Variant, folder: Path) -> Path:
    """Write ``variant`` of ``source`` into ``folder`` under the source's name; a GALAH per-CCD file
    gets its star's other CCD files beside it (the reader reads all four)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("galah_dr3", "galah_pipeline6"):
        for sibling in source.parent.glob(source.name[:-6] + "?.fits"):
            (folder / sibling.name).write_bytes(sibling.read_bytes())
    path = folder / source.name
    path.write_bytes(variant.data)
    return path


def forced_format(fmt: str) -> str | None:
    """The format to pass to read_spectra: only formats never detected from content need it."""
    return fmt if fmt == "lamost_mrs_exposure" else None
