"""Fuzz test (issue 15, item 6): every reader, through the registry's read entry point, and the
``stellarfield info`` / ``ingest`` commands get seeded corrupted variants of real files
(:mod:`fuzzing`: truncation at random offsets, flipped bytes, edited header cards, removed or
repeated HDUs, NaN/inf data). What must hold for each: no exception but a one-line
StellarfieldError naming the file; an answer within :data:`fuzzing.CASE_TIMEOUT_S` and without
gigabytes of memory; records that are returned have finite flux, ivar and wavelengths at good
pixels. The CLI: exit 0 with finite output, or exit 2 with one line on stderr.

The default run reads 12 formats x 25 variants (300 reads) and runs the CLI on 30 variants; the
slow sweep (CI) reads 12 x 300 and runs the CLI on 120 in process and 12 as real processes.

Then, one regression test per kind of failure the fuzz found (and the fixes in io/peek.py and
io/registry.py): a header whose structure values are absurd made astropy loop for minutes or
allocate gigabytes (NAXIS = 2**31-1, TFIELDS = 3e8, NAXIS1 < 0, GCOUNT < 0); a header whose
data size was edited made astropy search the data for the next header (9-20 s); an unparsable
card escaped as astropy's VerifyError; a flipped LOGLAM byte gave infinite wavelengths; astropy's
warnings about damaged cards printed more lines on stderr.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fuzzing import forced_format, read_case, record_problem, variants, write_case
from real_files import DEMO_FILE_OF_FORMAT, SHARED_FILE_OF_FORMAT, real_file, replace_card

from stellarfield.io import SpectrumReadError, read_spectra

FORMATS = sorted({**SHARED_FILE_OF_FORMAT, **DEMO_FILE_OF_FORMAT})
FAILURES = ("exception", "bad_message", "bad_record", "hang", "memory")


def _source(fmt: str, shared_data: Path, tmp_path: Path) -> Path:
    source = real_file(fmt, shared_data, tmp_path)
    if source is None:
        pytest.skip(f"no real {fmt} file on this machine")
    return source


def _fuzz_reader(fmt: str, shared_data: Path, tmp_path: Path, n: int, seed: int) -> Counter:
    source = _source(fmt, shared_data, tmp_path)
    outcomes: Counter = Counter()
    failures = []
    for i, variant in enumerate(variants(source, n, seed)):
        path = write_case(fmt, source, variant, tmp_path / f"case{i}")
        outcome, detail = read_case(path, forced_format(fmt))
        outcomes[outcome] += 1
        if outcome in FAILURES:
            failures.append(f"{outcome}: {variant.kind} ({variant.what}): {detail[:300]}")
    assert not failures, "\n".join(failures)
    return outcomes


def test_every_registered_reader_is_fuzzed():
    from stellarfield.io.registry import readers  # stellarfield.io.readers is also the readers' package

    assert set(FORMATS) == set(readers())


@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_answer_or_refuse_corrupted_files(fmt, shared_data, tmp_path):
    outcomes = _fuzz_reader(fmt, shared_data, tmp_path, n=25, seed=FORMATS.index(fmt))
    assert sum(outcomes.values()) == 25
    assert outcomes["refused"] >= 3, outcomes  # truncations at least are refused


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_readers_answer_or_refuse_a_large_sweep(fmt, shared_data, tmp_path):
    _fuzz_reader(fmt, shared_data, tmp_path, n=300, seed=1000 + FORMATS.index(fmt))


# --- the commands ----------------------------------------------------------------------------
def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``stellarfield ARGV`` run in this process: (exit code, stdout, stderr)."""
    from stellarfield.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return int(code or 0), out.getvalue(), err.getvalue()


def _cli_problem(command: str, code: int, stdout: str, stderr: str, dataset: Path | None = None) -> str | None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code == 0:
        if command == "info" and any(w in stdout.lower() for w in (" nan ", " inf ", "nan -", "- nan", "-inf")):
            return f"exit 0 with non-finite numbers: {stdout[:300]}"
        if dataset is not None:
            from stellarfield.data.store import Dataset

            for s in Dataset(dataset).iter_spectra():
                problem = record_problem(s)
                if problem:
                    return f"exit 0, dataset holds {problem}"
        return None
    if code != 2:
        return f"exit {code}: {stderr[:300]}"
    errors = [line for line in lines if line.startswith(f"stellarfield {command}: error:")]
    others = [line for line in lines if not line.startswith("  skipped ")]  # ingest lists each file's reason
    if len(errors) != 1 or len(others) != 1:
        return f"stderr is not one error line: {stderr[:400]}"
    return None


def _fuzz_cli(shared_data: Path, tmp_path: Path, per_format: int, seed: int, ingest_every: int) -> Counter:
    outcomes: Counter = Counter()
    failures = []
    for k, fmt in enumerate(f for f in FORMATS if f != "lamost_mrs_exposure"):  # read on request only
        source = _source(fmt, shared_data, tmp_path)
        for i, variant in enumerate(variants(source, per_format, seed + k)):
            case = tmp_path / f"{fmt}{i}"
            path = write_case(fmt, source, variant, case / "in")
            if (k * per_format + i) % ingest_every == 0:
                command, out = "ingest", case / "DS"
                code, stdout, stderr = _cli(["ingest", str(path), "--out", str(out), "--quiet", "--workers", "1"])
            else:
                command, out = "info", None
                code, stdout, stderr = _cli(["info", str(path)])
            outcomes[(command, code)] += 1
            problem = _cli_problem(command, code, stdout, stderr, out if code == 0 else None)
            if problem:
                failures.append(f"{command} {fmt} {variant.kind} ({variant.what}): {problem}")
    assert not failures, "\n".join(failures)
    return outcomes


def test_info_and_ingest_answer_or_refuse_corrupted_files(shared_data, tmp_path):
    outcomes = _fuzz_cli(shared_data, tmp_path, per_format=3, seed=500, ingest_every=3)  # 33 runs, 11 ingests
    assert outcomes[("info", 0)] and outcomes[("info", 2)], outcomes


@pytest.mark.slow
def test_info_and_ingest_a_large_sweep(shared_data, tmp_path):
    _fuzz_cli(shared_data, tmp_path, per_format=12, seed=2000, ingest_every=4)


def _run_cli_process(argv: list[str]) -> tuple[int, str, str]:
    command = "import sys; from stellarfield.cli.app import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", command, *argv], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "lamost_mrs_exposure"])
def test_the_command_as_a_process_prints_one_line(fmt, shared_data, tmp_path):
    """As a real process: warnings (astropy's about damaged cards) would reach stderr here."""
    source = _source(fmt, shared_data, tmp_path)
    variant = next(v for v in variants(source, 8, 3000 + FORMATS.index(fmt)) if v.kind == "flip_header")
    path = write_case(fmt, source, variant, tmp_path / "in")
    code, stdout, stderr = _run_cli_process(["info", str(path)])
    assert _cli_problem("info", code, stdout, stderr) is None, (variant.what, code, stderr)


def test_a_damaged_header_gives_one_line_from_the_command_process(shared_data, tmp_path):
    """Regression: astropy printed 'WARNING: non-ASCII characters are present in the FITS file
    header' lines before (or instead of) the one-line answer."""
    source = shared_data / SHARED_FILE_OF_FORMAT["miles"]
    raw = bytearray(source.read_bytes())
    raw[334] ^= 0xC3  # a non-ASCII byte in a card that no reader needs (OBJECT's comment)
    path = tmp_path / source.name
    path.write_bytes(bytes(raw))
    code, stdout, stderr = _run_cli_process(["info", str(path)])
    assert "WARNING" not in stderr
    assert _cli_problem("info", code, stdout, stderr) is None


# --- regressions, one per kind of failure found ---------------------------------------------
@pytest.mark.parametrize("fmt, keyword, value, reason", [
    ("miles", "NAXIS", "2147483647", "NAXIS = 2147483647 is out of range (0-999)"),  # astropy: 20 s, then a hang
    ("lamost_mrs", "TFIELDS", "300000000", "TFIELDS = 300000000 is out of range (0-999)"),  # astropy: > 3 GB
    ("apogee_apstar", "NAXIS1", "-8575", "NAXIS1 = -8575 is out of range (>= 0)"),  # 20 s
    ("apogee_apstar", "GCOUNT", "-1", "GCOUNT = -1 is out of range (>= 1)"),  # 20 s
    ("apogee_apstar", "BITPIX", "-63", "BITPIX = -63 is not one of"),
])
def test_absurd_structure_values_are_refused_at_once(fmt, keyword, value, reason, shared_data, tmp_path):
    source = shared_data / SHARED_FILE_OF_FORMAT[fmt]
    path = tmp_path / source.name
    path.write_bytes(replace_card(source.read_bytes(), keyword, value, occurrence=1 if keyword == "TFIELDS" else 0))
    start = time.perf_counter()
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(path)
    assert time.perf_counter() - start < 2.0
    assert reason in err.value.reason and str(err.value).startswith(str(path))


def test_a_header_with_a_wrong_data_size_is_refused_at_once(shared_data, tmp_path):
    """apStar HDU 1 NAXIS1 8575 -> 4287: astropy looked through the data for the next header (9.5 s)."""
    source = shared_data / SHARED_FILE_OF_FORMAT["apogee_apstar"]
    path = tmp_path / source.name
    path.write_bytes(replace_card(source.read_bytes(), "NAXIS1", "4287"))  # HDU 0 has no axes: this is HDU 1
    start = time.perf_counter()
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(path)
    assert time.perf_counter() - start < 2.0
    assert "no FITS header where HDU 2" in err.value.reason


def test_an_unparsable_unit_card_is_refused_not_a_verify_error(shared_data, tmp_path):
    """GALAH DR3 CCD file whose CUNIT1 card is damaged: astropy's VerifyError escaped the read API."""
    source = shared_data / SHARED_FILE_OF_FORMAT["galah_dr3"]
    for sibling in source.parent.glob(source.name[:-6] + "?.fits"):
        (tmp_path / sibling.name).write_bytes(sibling.read_bytes())
    raw = bytearray(source.read_bytes())
    card = raw.index(b"CUNIT1  = 'Angstroms'")
    raw[card + 10] = ord("x")  # "CUNIT1  = xAngstroms'": no longer a string
    path = tmp_path / source.name
    path.write_bytes(bytes(raw))
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(path)
    assert "HDU 0 CUNIT1 card cannot be read" in err.value.reason


def test_infinite_wavelengths_are_refused(shared_data, tmp_path):
    """LAMOST MRS exposure with a LOGLAM value made huge by flipped bytes: 10**LOGLAM is infinite."""
    from astropy.io import fits

    source = shared_data / SHARED_FILE_OF_FORMAT["lamost_mrs_exposure"]
    path = tmp_path / source.name
    with fits.open(source) as hdul:
        exposure = next(i for i, h in enumerate(hdul) if str(h.header.get("EXTNAME", "")).startswith("B-"))
        hdul[exposure].data["LOGLAM"][-1] = 400.0  # one row per pixel
        hdul.writeto(path)
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(path, format="lamost_mrs_exposure")
    assert "wavelengths are not finite" in err.value.reason


def test_records_from_the_fuzz_are_checked_for_non_finite_flux_at_good_pixels():
    """The fuzz's own check: a good pixel with a NaN flux is a failure (Segment masks such pixels)."""
    from stellarfield.spectrum import Segment, Spectrum

    seg = Segment("full", np.array([5000.0, 5001.0]), np.array([1.0, np.nan]), np.ones(2), np.ones(2, bool))
    assert seg.mask.tolist() == [True, False]
    spectrum = Spectrum("x", "S", "I", "miles", [seg], frame="rest", normalisation="flux")
    assert record_problem(spectrum) is None
    seg.mask[:] = True  # as a reader that bypassed the Segment's check would leave it
    assert "non-finite flux" in record_problem(spectrum)
