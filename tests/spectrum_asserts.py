"""Assertions shared by tests: two spectrum records are identical field by field."""

from __future__ import annotations

import math

import numpy as np

from stellarfield.spectrum import Spectrum


def assert_same_spectrum(a: Spectrum, b: Spectrum) -> None:
    """Every field equal; arrays equal with the same dtype (NaN == NaN); labels NaN-aware."""
    for name in ("object_id", "survey", "instrument", "product", "observation_id", "frame",
                 "normalisation", "resolution", "noise_known", "flux_unit", "provenance", "meta"):
        assert getattr(a, name) == getattr(b, name), name
    assert type(a.resolution) is type(b.resolution)
    assert a.labels.keys() == b.labels.keys()
    for k in a.labels:
        assert a.labels[k] == b.labels[k] or (math.isnan(a.labels[k]) and math.isnan(b.labels[k])), k
    assert [s.name for s in a.segments] == [s.name for s in b.segments]
    for sa, sb in zip(a.segments, b.segments):
        for name in ("wavelength", "flux", "ivar", "mask"):
            x, y = getattr(sa, name), getattr(sb, name)
            assert x.dtype == y.dtype, (sa.name, name)
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (sa.name, name)
        assert (sa.lsf_fwhm is None) == (sb.lsf_fwhm is None), sa.name
        if sa.lsf_fwhm is not None:
            assert sb.lsf_fwhm.dtype == np.float32
            assert np.array_equal(sa.lsf_fwhm, sb.lsf_fwhm, equal_nan=True)
