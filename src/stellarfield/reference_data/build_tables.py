"""Rebuild the shipped line tables of this folder from the full reference files (not run at import).

    python src/stellarfield/reference_data/build_tables.py /work/shared/reference/linelists

Writes, next to this script:

* ``galah_dr3_lines.csv``: atomic lines of the GALAH DR3 line list (Buder et al. 2021, via Korg.jl)
  inside GALAH's four CCD windows (+-5 A), H I and the ions/neutrals of the elements GALAH DR3
  measures, hyperfine/isotopic components of one transition (same species and lower level, within
  :data:`HFS_MERGE_A`) merged into one line (gf summed, wavelength gf-weighted), the strongest of
  each species by the excitation-weighted oscillator strength
  ``log gf - (5040 / 5000 K) E_lower`` (Gray, The Observation and Analysis of Stellar Photospheres,
  ch. 16): within one species the abundance and ionisation are the same for every line, so this
  ranks that species' lines by strength at 5000 K; the top ``TOP_FRACTION`` of each species, at least
  ``MIN_PER_SPECIES`` and at most ``MAX_PER_SPECIES``. Molecular lines are left out (molecular
  bands are in ``spectral_features.csv``).
* ``aspcap_dr12_windows.csv``: every non-zero weight of APOGEE ASPCAP DR12's per-element windows
  (jobovy/apogee ``apogee/spec/filter/dr12/*.filt``) with its apStar pixel and vacuum wavelength
  ``10**(4.179 + 6e-6 i)``.
* ``spectral_features.csv``: hydrogen lines, molecular bands and strong atomic blends in the optical
  and near-IR (Lick index bands of Trager et al. 1998 and Worthey & Ottaviani 1997, NIST air
  wavelengths), converted from air to vacuum (Morton 2000, :mod:`stellarfield.physics.air_vacuum`).
"""

from __future__ import annotations

import csv
import gzip
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
#: GALAH's four CCD windows (vacuum A) and the margin kept around them.
GALAH_WINDOWS = ((4713.0, 4903.0), (5648.0, 5873.0), (6478.0, 6737.0), (7585.0, 7887.0))
MARGIN_A = 5.0
#: Elements GALAH DR3 reports abundances of (Buder et al. 2021, table 2), and H.
GALAH_ELEMENTS = ("H", "Li", "C", "O", "Na", "Mg", "Al", "Si", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co",
                  "Ni", "Cu", "Zn", "Rb", "Sr", "Y", "Zr", "Mo", "Ru", "Ba", "La", "Ce", "Nd", "Sm", "Eu")
TOP_FRACTION, MIN_PER_SPECIES, MAX_PER_SPECIES = 0.12, 6, 150
#: Components of one species within this (A) and with the same lower level (0.01 eV) are one line.
HFS_MERGE_A = 0.1
THETA = 5040.0 / 5000.0


def galah_lines(source: Path) -> list[dict]:
    with gzip.open(source / "galah_dr3_linelist.csv.gz", "rt") as f:
        rows = list(csv.DictReader(f))
    by_species: dict[str, list[dict]] = {}
    for r in rows:
        parts = r["species"].split()
        if len(parts) != 2 or parts[0] not in GALAH_ELEMENTS or parts[1] not in ("I", "II"):
            continue
        lam = float(r["wavelength_vacuum_A"])
        if not any(lo - MARGIN_A <= lam <= hi + MARGIN_A for lo, hi in GALAH_WINDOWS):
            continue
        strength = float(r["log_gf"]) - THETA * float(r["E_lower_eV"])
        by_species.setdefault(r["species"], []).append(dict(
            wavelength_vacuum_A=lam, species=r["species"], element=parts[0], log_gf=float(r["log_gf"]),
            E_lower_eV=float(r["E_lower_eV"]), strength=strength))
    out = []
    for species, lines in by_species.items():
        lines = merge_components(lines)
        lines.sort(key=lambda d: -d["strength"])
        keep = int(np.clip(round(TOP_FRACTION * len(lines)), MIN_PER_SPECIES, MAX_PER_SPECIES))
        for rank, d in enumerate(lines[:keep]):
            out.append({**d, "rank_in_species": rank + 1})
    out.sort(key=lambda d: d["wavelength_vacuum_A"])
    return out


def merge_components(lines: list[dict]) -> list[dict]:
    """One line per transition: components (sorted by wavelength) within HFS_MERGE_A of the group's
    first and with the same E_lower (0.01 eV) are summed."""
    lines = sorted(lines, key=lambda d: d["wavelength_vacuum_A"])
    groups: list[list[dict]] = []
    for d in lines:
        g = groups[-1] if groups else None
        if g and d["wavelength_vacuum_A"] - g[0]["wavelength_vacuum_A"] <= HFS_MERGE_A and \
                abs(d["E_lower_eV"] - g[0]["E_lower_eV"]) < 0.01:
            g.append(d)
        else:
            groups.append([d])
    out = []
    for g in groups:
        gf = np.array([10 ** d["log_gf"] for d in g])
        top = g[int(np.argmax(gf))]
        log_gf = float(np.log10(gf.sum()))
        out.append(dict(top, wavelength_vacuum_A=float((gf * [d["wavelength_vacuum_A"] for d in g]).sum() / gf.sum()),
                        log_gf=log_gf, strength=log_gf - THETA * top["E_lower_eV"], n_components=len(g)))
    return out


def aspcap_windows(source: Path) -> list[dict]:
    folder = source / "aspcap_windows"
    pixels = np.loadtxt(folder / "apstar_pixel.txt", dtype=int)
    out = []
    for path in sorted(folder.glob("*.filt")):
        weights = np.loadtxt(path)
        assert len(weights) == len(pixels), path
        for i in np.flatnonzero(weights > 0):
            p = int(pixels[i])
            out.append(dict(element=path.stem, apstar_pixel=p, wavelength_vacuum_A=10 ** (4.179 + 6e-6 * p),
                            weight=float(weights[i])))
    out.sort(key=lambda d: (d["element"], d["apstar_pixel"]))
    return out


def spectral_features() -> list[dict]:
    from stellarfield.physics.air_vacuum import air_to_vacuum

    nist = "NIST ASD air wavelength, band +-{w} A chosen here"
    lick = "Lick index band, Trager et al. 1998 (ApJS 116, 1), table 2"
    wo97 = "Lick index band, Worthey & Ottaviani 1997 (ApJS 111, 377)"
    # name, kind, species, (lo, hi) air A, centre air A (None: band middle), source
    air = [
        ("H-alpha", "hydrogen", "H I", None, 6562.79, 15.0, nist),
        ("H-beta", "hydrogen", "H I", (4847.875, 4876.625), 4861.35, None, lick),
        ("H-gamma", "hydrogen", "H I", (4319.750, 4363.500), 4340.47, None, wo97),
        ("H-delta", "hydrogen", "H I", (4083.500, 4122.250), 4101.74, None, wo97),
        ("H-epsilon + Ca II H", "hydrogen", "H I", None, 3970.07, 8.0, nist),
        ("H8", "hydrogen", "H I", None, 3889.05, 6.0, nist),
        ("Ca II K", "atomic", "Ca II", None, 3933.66, 8.0, nist),
        ("CN 4150 (CN_1)", "molecular", "CN", (4142.125, 4177.125), None, None, lick),
        ("Ca I 4227", "atomic", "Ca I", (4222.250, 4234.750), 4226.73, None, lick),
        ("G band (CH, G4300)", "molecular", "CH", (4281.375, 4316.375), None, None, lick),
        ("Mg b", "atomic", "Mg I", (5160.125, 5192.625), 5172.68, None, lick),
        ("Fe 5270", "atomic", "Fe I", (5245.650, 5285.650), None, None, lick),
        ("Fe 5335", "atomic", "Fe I", (5312.125, 5352.125), None, None, lick),
        ("Na D", "atomic", "Na I", (5876.875, 5909.375), 5889.95, None, lick),
        ("TiO 5960 (TiO_1)", "molecular", "TiO", (5936.625, 5994.125), None, None, lick),
        ("TiO 6230 (TiO_2)", "molecular", "TiO", (6189.625, 6272.125), None, None, lick),
        ("TiO 7050 band head", "molecular", "TiO", (7050.0, 7150.0), None, None,
         "TiO gamma-system band head at 7054 A; band chosen here"),
        ("K I 7665/7699", "atomic", "K I", (7655.0, 7710.0), None, None, "NIST ASD air wavelengths; band chosen here"),
        ("Ca II 8498", "atomic", "Ca II", None, 8498.02, 5.0, nist),
        ("Ca II 8542", "atomic", "Ca II", None, 8542.09, 5.0, nist),
        ("Ca II 8662", "atomic", "Ca II", None, 8662.14, 5.0, nist),
    ]
    out = []
    for name, kind, species, band, centre, half, source in air:
        if band is None:
            band = (centre - half, centre + half)
            source = source.format(w=half)
        lo, hi = (float(x) for x in air_to_vacuum(np.asarray(band, dtype=np.float64)))
        c = float(air_to_vacuum(np.float64(centre))) if centre is not None else 0.5 * (lo + hi)
        out.append(dict(name=name, kind=kind, species=species, element=species.split()[0] if " " in species else "",
                        lo_vacuum_A=lo, hi_vacuum_A=hi, center_vacuum_A=c, source=source))
    # Brackett series in the APOGEE H band (vacuum, Rydberg formula for H with R_H = 109677.583 /cm)
    for n in range(11, 21):
        lam = 1e8 / (109677.583 * (1 / 16 - 1 / n**2))
        if 15100 < lam < 17000:
            out.append(dict(name=f"Brackett {n}-4", kind="hydrogen", species="H I", element="H",
                            lo_vacuum_A=lam - 8.0, hi_vacuum_A=lam + 8.0, center_vacuum_A=lam,
                            source="Rydberg formula (vacuum); band +-8 A chosen here"))
    out.sort(key=lambda d: d["center_vacuum_A"])
    return out


def write(path: Path, rows: list[dict], floats: dict[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (format(v, floats[k]) if k in floats else v) for k, v in r.items()})


def main(source: str) -> None:
    source = Path(source)
    lines = galah_lines(source)
    write(HERE / "galah_dr3_lines.csv", lines,
          {"wavelength_vacuum_A": ".4f", "log_gf": ".3f", "E_lower_eV": ".4f", "strength": ".3f"})
    windows = aspcap_windows(source)
    write(HERE / "aspcap_dr12_windows.csv", windows, {"wavelength_vacuum_A": ".4f", "weight": ".6g"})
    features = spectral_features()
    write(HERE / "spectral_features.csv", features,
          {"lo_vacuum_A": ".2f", "hi_vacuum_A": ".2f", "center_vacuum_A": ".2f"})
    print(f"{len(lines)} lines, {len(windows)} window pixels, {len(features)} features")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/reference/linelists")
