"""One star, two telescopes: canonical star ids, their resolution across products, the split by star."""

from __future__ import annotations

import json
from importlib import metadata
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from stellarfield.data.split import assign_split, split_id
from stellarfield.data.stars import (
    StarIdentity,
    assign_star_ids,
    candidate_id,
    coordinate_id,
    describe_dataset_stars,
    identity_of,
    normalise_name,
    resolve_star_ids,
    stars_in_several_products,
)
from stellarfield.data.store import Dataset, DatasetWriter
from stellarfield.io import read_spectra
from stellarfield.io.readers.miles import parse_iac_parameter_table


@pytest.mark.parametrize(
    "written, canonical",
    [
        ("HD044691A", "HD 44691 A"),  # MILES, component letter
        ("HD 030210         Cl", None),  # the cluster flag is the caller's to strip (identity_of does)
        ("HD 030210", "HD 30210"),  # MILES cluster stars: space and padding
        ("HD030210", "HD 30210"),
        ("HD26630", "HD 26630"),  # STELIB OBJECT, unpadded
        ("HD026630", "HD 26630"),  # STELIB file name, padded
        ("HR718", "HR 718"),
        ("hr 0718", "HR 718"),
        ("BD+002058A", "BD+00 2058 A"),  # MILES: zone and number written together
        ("BD +00 2058 A", "BD+00 2058 A"),
        ("BD-010306", "BD-01 306"),
        ("CD-2415398", "CD-24 15398"),
        ("G004-036", "G 4-36"),  # Giclas, MILES' padding
        ("G 4-36", "G 4-36"),
        ("LHS1930", "LHS 1930"),
        ("Feige110", "Feige 110"),
        ("2M00452143+1634446", "2M00452143+1634446"),  # APOGEE's own form is kept
        ("2MASS J00452143+1634446", "2M00452143+1634446"),
        ("LAMOST J192814.09+435531.0", "LAMOST J192814.09+435531.0"),
        ("M71 1-37", None),
        ("G319", None),
        ("140310003801049", None),  # a GALAH sobject_id names an observation, not a star
    ],
)
def test_normalise_name(written, canonical):
    assert normalise_name(written) == canonical


def test_component_a_is_the_primary():
    assert candidate_id("HD048682A") == candidate_id("HD048682") == "HD 48682"
    assert candidate_id("HD048682B") == "HD 48682 B"


def test_coordinate_id_is_how_lamost_designates(shared_data):
    from astropy.io import fits

    for path in sorted((shared_data / "lamost_laspec").glob("*.fits*")):
        header = fits.getheader(path)
        assert "LAMOST " + coordinate_id(header["RA"], header["DEC"]) == header["DESIG"], path.name


def _identity(*names, ra=float("nan"), dec=float("nan")):
    record = SimpleNamespace(star_id=None, object_id=names[0], meta={"star_aliases": ",".join(names[1:]),
                                                                    "ra_deg": ra, "dec_deg": dec})
    return identity_of(record)


def test_resolution_by_names_and_positions():
    identities = {
        "a": _identity("HD015318"),
        "b": _identity("HR718", "HD 15318"),  # linked to a by its HD alias; HD outranks HR
        "c": _identity("LAMOST J000000.00+100000.0", ra=0.0, dec=10.0),
        "d": _identity("LAMOST J000000.04+100000.0", ra=0.0 + 0.6 / 3600, dec=10.0),  # 0.6 arcsec from c
        "e": _identity("LAMOST J000000.04+100000.0", ra=0.0 + 0.6 / 3600, dec=10.0 + 1 / 3600),
        "f": _identity("LAMOST J000000.00+100006.0", ra=0.0, dec=10.0 + 6 / 3600),  # 6 arcsec: another star
        "g": _identity("m0001"),  # no catalogue name, no position
    }
    resolved = resolve_star_ids(identities)
    assert resolved["a"] == resolved["b"] == "HD 15318"
    # c, d, e are one star; its id is the designation most of them carry
    assert resolved["c"] == resolved["d"] == resolved["e"] == "LAMOST J000000.04+100000.0"
    assert resolved["f"] == "LAMOST J000000.00+100006.0"
    assert resolved["g"] is None


def test_position_only_record_gets_a_coordinate_id():
    ident = StarIdentity((), frozenset(), 292.058716, 43.925304)
    assert ident.star_id == "J192814.09+435531.0"
    assert resolve_star_ids({"x": ident}) == {"x": "J192814.09+435531.0"}


def test_split_is_drawn_from_the_star_id():
    one = SimpleNamespace(object_id="m0232", star_id="HD 48682")
    other = SimpleNamespace(object_id="HD048682A", star_id="HD 48682")
    unknown = SimpleNamespace(object_id="m0959", star_id=None)
    assert split_id(one) == split_id(other) == "HD 48682"
    assert split_id(unknown) == "m0959"


def test_kic_8098300_one_star_in_lrs_and_mrs(shared_data):
    folder = shared_data / "lamost_laspec"
    records = [s for path in sorted(folder.glob("*.fits*")) for s in read_spectra(path)]
    assign_star_ids(records)
    kic = {s.key: s.star_id for s in records if abs(s.meta["ra_deg"] - 292.0587) < 0.001}
    # 7 MRS nights + 1 LRS, under three designations, one star
    assert len(kic) == 8 and {k.split("/")[0] for k in kic} == {"lamost_lrs", "lamost_mrs"}
    assert len({k.split("/")[1] for k in kic}) == 3
    assert set(kic.values()) == {"LAMOST J192814.09+435531.0"}
    others = {s.star_id for s in records if s.key not in kic}
    assert others == {"LAMOST J230311.44+321335.5", "LAMOST J013730.44+252537.7"}


@pytest.fixture(scope="module")
def stelib_records():
    try:
        metadata.distribution("sdss-mangadap")
    except metadata.PackageNotFoundError:
        pytest.skip("sdss-mangadap (part of the [demo] extra) is not installed")
    from stellarfield.io.demo_sources import demo_files

    return [s for path in demo_files(["stelib"])["stelib"] for s in read_spectra(path)]


def test_miles_and_stelib_share_118_stars(shared_data, stelib_records):
    """All 985 MILES names (parameter table, as the MILES reader puts them in meta) against STELIB."""
    table = parse_iac_parameter_table(shared_data / "miles" / "paramsMILES_v9.1.txt")
    miles = [SimpleNamespace(object_id=m, star_id=None, meta={"star_name": row["star_name"]}, product="miles",
                             key=f"miles/{m}") for m, row in table.items() if m != "m0970"]
    records = miles + stelib_records
    identities = {r.key: identity_of(r) for r in records}
    resolved = resolve_star_ids(identities)
    rows = [{"star_id": resolved[r.key], "object_id": r.object_id, "product": r.product} for r in records]
    shared = stars_in_several_products(rows)
    assert len(shared) == 118
    assert all(s["products"] == {"miles": 1, "stelib": 1} for s in shared)
    # a crude match of the names as written finds 117: HD 48682 is "HD048682" in MILES, "HD048682A" in STELIB
    crude = {r.meta["star_name"] for r in miles} & {r.object_id for r in stelib_records}
    assert len(crude) == 117
    by_id = {s["star_id"]: s["object_ids"] for s in shared}
    assert by_id["HD 48682"] == ["HD048682A", "m0232"]
    assert by_id["HD 114330"] == ["HD114330", "m0461"]  # STELIB's header calls it HR4963
    # HD 53929's two STELIB spectra are one star, not in MILES
    assert {r.key: resolved[r.key] for r in stelib_records if r.object_id == "HD053929"} == {
        "stelib/HD053929/lp": "HD 53929", "stelib/HD053929/ss": "HD 53929"}


def test_a_dataset_resolves_star_ids_and_splits_by_star(shared_data, stelib_records, tmp_path, capsys):
    stelib = [s for s in stelib_records if s.object_id in ("HD048682A", "HD048682B")]
    miles = read_spectra(shared_data / "miles" / "MILES_res2.50_star_m0232V.fits")
    lamost = [s for p in sorted((shared_data / "lamost_laspec").glob("*.fits*")) for s in read_spectra(p)]
    lamost = [s for s in lamost if s.mask.any()]  # as ingest keeps them
    out = tmp_path / "DS"
    with DatasetWriter(out, shard_size=3) as writer:  # several shards: rows resolved in others are rewritten
        writer.write_many(stelib + miles + lamost)
    assert [s.star_id for s in lamost][:1] == ["LAMOST J192814.09+435531.0"]  # the caller's records untouched
    ds = Dataset(out)
    assert ds.verify() == []
    rows = ds.table(["key", "star_id", "split"]).to_pylist()
    star = {r["key"]: r["star_id"] for r in rows}
    assert star["miles/m0232"] == star["stelib/HD048682A"] == "HD 48682"
    assert star["stelib/HD048682B"] == "HD 48682 B"
    assert star["lamost_mrs/LAMOST J192814.09+435530.7/747810159"] == "LAMOST J192814.09+435531.0"
    assert star["lamost_lrs/LAMOST J192814.09+435530.8/359910161"] == "LAMOST J192814.09+435531.0"
    for r in rows:
        assert r["split"] == assign_split(r["star_id"])
    assert ds.get("lamost_lrs/LAMOST J192814.09+435530.8/359910161").star_id == "LAMOST J192814.09+435531.0"
    assert ds.manifest["stars"]["in_several_products"] == 2 and ds.manifest["schema_version"] == 2
    text = describe_dataset_stars(ds)
    assert "stars seen by two or more products: 2" in text
    assert "HD 48682" in text and "miles 1, stelib 1" in text and "lamost_lrs 1, lamost_mrs 5" in text

    from stellarfield.cli import main

    assert main(["info", str(out), "--stars"]) == 0
    printed = capsys.readouterr().out
    assert "stars seen by two or more products: 2" in printed and "miles + stelib: 1 stars" in printed


def test_datasets_written_before_star_ids_stay_readable(shared_data, tmp_path):
    out = tmp_path / "old"
    with DatasetWriter(out) as writer:
        writer.write_many(read_spectra(shared_data / "miles" / "MILES_res2.50_star_m0232V.fits"))
    # make it what schema version 1 wrote: no star_id column
    shard = out / "shard-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.drop_columns(["star_id"]), shard)
    manifest = json.loads((out / "_manifest.json").read_text())
    manifest["schema_version"] = 1
    manifest.pop("stars")
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (out / "_manifest.json").write_text(json.dumps(manifest))
    ds = Dataset(out)
    (record,) = list(ds.iter_spectra())
    assert record.star_id is None and record.object_id == "m0232"
    assert ds[0].star_id is None and ds.get("miles/m0232").star_id is None
    assert ds.table(["key", "star_id"]).column("star_id").to_pylist() == [None]
    assert ds.verify() == []
    assert "written before star ids" in describe_dataset_stars(ds)


def test_names_are_tried_against_every_pattern_their_first_character_allows():
    """_parse tries a name only on the patterns whose leading literal is its first character."""
    from stellarfield.data.stars import _PATTERNS, _PATTERNS_BY_FIRST

    for catalogue, pattern, _ in _PATTERNS:
        head = pattern.pattern[1:]
        firsts = "BCD" if head.startswith("(BD|CD|CPD)") else head[0]
        assert head.startswith("(BD|CD|CPD)") or head[0].isalnum(), pattern.pattern
        for char in firsts:
            assert any(p is pattern for _, p, *_ in _PATTERNS_BY_FIRST[char]), (catalogue, char)
    assert sum(len(v) for v in _PATTERNS_BY_FIRST.values()) == len(_PATTERNS) + 4  # the two BD patterns: B, C and D
