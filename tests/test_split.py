"""The train/validation/test split: deterministic by star, in the asked-for fractions."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from stellarfield.data.split import SPLITS, assign_split, split_counts, split_uniform


def reference_uniform(object_id: str, salt: str = "stellarfield-split-v1") -> float:
    """The hash definition written out independently of the module (see split.py's docstring)."""
    digest = hashlib.blake2b(f"{salt}/{object_id.strip()}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def reference_split(object_id: str, fractions=(0.8, 0.1, 0.1), salt: str = "stellarfield-split-v1") -> str:
    u = reference_uniform(object_id, salt)
    return "train" if u < fractions[0] else "validation" if u < fractions[0] + fractions[1] else "test"


def test_fixed_ids_have_fixed_splits():
    # Values computed once from the definition; they must never change, or every dataset
    # written before would disagree with one written after.
    assert reference_uniform("2M00452143+1634446") == pytest.approx(0.6037871759643163, abs=1e-15)
    assert assign_split("2M00452143+1634446") == "train"
    assert assign_split("m0002") == "validation"  # u = 0.8293...
    assert assign_split("140310003801049") == "test"  # u = 0.9577...
    for object_id in ("2M00452143+1634446", "m0002", "140310003801049", "x", "2M03122509+0021585"):
        assert split_uniform(object_id) == reference_uniform(object_id)
        assert assign_split(object_id) == reference_split(object_id)


def test_same_result_in_a_fresh_interpreter():
    """Python's own hash() of a str changes per process; ours must not."""
    ids = [f"star-{i}" for i in range(50)]
    code = (
        "from stellarfield.data.split import assign_split;"
        f"print(','.join(assign_split(i) for i in {ids!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"}
    ).stdout.strip()
    assert out.split(",") == [assign_split(i) for i in ids]


def test_whitespace_around_an_id_is_ignored():
    assert assign_split("  2M00452143+1634446 ") == assign_split("2M00452143+1634446")


def test_fractions_on_10000_ids():
    counts = split_counts(f"2M{i:08d}+{i % 997:07d}" for i in range(10_000))
    assert set(counts) == set(SPLITS) and sum(counts.values()) == 10_000
    # Binomial standard deviation for p = 0.1, n = 10,000 is 30; allow 5 sigma.
    assert abs(counts["train"] - 8000) < 200
    assert abs(counts["validation"] - 1000) < 150
    assert abs(counts["test"] - 1000) < 150


def test_other_fractions_and_salt():
    ids = [f"id{i}" for i in range(5000)]
    counts = split_counts(ids, fractions=(0.5, 0.0, 0.5))
    assert counts["validation"] == 0
    assert abs(counts["train"] - 2500) < 200
    # A different salt draws an independent split: about 80% x 80% + 2 x 10% x 10% = 66% agree.
    agree = sum(assign_split(i) == assign_split(i, salt="other") for i in ids) / len(ids)
    assert 0.60 < agree < 0.72
    assert all(assign_split(i, fractions=(1, 0, 0)) == "train" for i in ids[:100])


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="fractions"):
        assign_split("x", fractions=fractions)
