"""Nuisance invariance: shifting a real spectrum by a radial velocity moves the fitted RV by exactly
that velocity and leaves the latent (the star) nearly where it was (slow: trains a small model)."""

from __future__ import annotations

import copy
import glob

import numpy as np
import pytest
import torch

from stellarfield.io import read_spectra
from stellarfield.model import fit_spectra
from stellarfield.model.train import TrainConfig, train
from stellarfield.physics.doppler import C_KMS

SHIFTS_KMS = (-180.0, -40.0, 0.0, 65.0, 230.0)



def shifted(spectrum, v_kms: float):
    """The same star moving ``v_kms`` faster: every wavelength times (1 + v/c), flux unchanged."""
    out = copy.deepcopy(spectrum)
    for seg in out.segments:
        seg.wavelength = seg.wavelength * (1 + v_kms / C_KMS)
    out.observation_id = f"{spectrum.observation_id}+{v_kms:g}"
    return out


@pytest.mark.slow
def test_shifting_a_spectrum_moves_the_rv_not_the_latent(shared_data, tmp_path):
    files = sorted(glob.glob(str(shared_data / "apogee/aspcapstar/*.fits")))[:6]
    files += sorted(glob.glob(str(shared_data / "apogee/apvisit/apVisit-2M*.fits")))[:10]
    spectra = [s for f in files for s in read_spectra(f)]
    config = TrainConfig(max_steps=150, minutes=None, split_spectra=False, batch_per_product=8, prior_steps=50,
                         latent_dim=8, n_basis=32, final_val_refine_steps=5, val_refine_steps=5)
    result = train(spectra, tmp_path / "run", config, progress=False)

    visit = [s for s in spectra if s.product == "apogee_apvisit"][-1]
    others = [s for s in spectra if s.product == "apogee_apvisit"][:-1]
    table = fit_spectra(result, [shifted(visit, v) for v in SHIFTS_KMS] + others, refine_steps=100).to_pylist()
    rows, rest = table[: len(SHIFTS_KMS)], table[len(SHIFTS_KMS):]
    v0 = rows[SHIFTS_KMS.index(0.0)]["rv_kms"]
    z0 = np.array(rows[SHIFTS_KMS.index(0.0)]["latent"])
    # the fitted RV follows the shift (APOGEE LSF sigma is 5.7 km/s)
    for v, row in zip(SHIFTS_KMS, rows):
        assert row["rv_kms"] - v0 == pytest.approx(v, abs=0.3), (v, row["rv_kms"], v0)
    # the latent moves by a small fraction of the distance between different stars' latents
    moves = [np.linalg.norm(np.array(r["latent"]) - z0) for r in rows]
    between = np.median([np.linalg.norm(np.array(r["latent"]) - z0) for r in rest])
    print("rv offsets", [round(r["rv_kms"] - v0 - v, 3) for v, r in zip(SHIFTS_KMS, rows)], "latent moves", np.round(moves, 4), "between stars", round(float(between), 3))
    assert max(moves) < 0.1 * between, (moves, between)
