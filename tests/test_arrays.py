"""``stellarfield.arrays``: the row-wise NaN median is numpy's, value for value."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.arrays import nanmedian_rows


@pytest.mark.parametrize("n_pixels", [1, 2, 7, 343])
def test_nanmedian_rows_equals_numpy(n_pixels):
    rng = np.random.default_rng(n_pixels)
    values = rng.normal(size=(200, n_pixels)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = np.nan
    values[0] = np.nan  # a row without any value: NaN
    values[1, :] = 3.0  # a constant row
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        expected = np.nanmedian(values, axis=1)
    got = nanmedian_rows(values)
    assert np.array_equal(got, expected, equal_nan=True)
    assert np.isnan(got[0]) and got[1] == 3.0


def test_nanmedian_rows_even_and_odd_counts_and_shape_errors():
    values = np.array([[4.0, np.nan, 1.0, 3.0, 2.0], [np.nan, 5.0, np.nan, 1.0, np.nan], [9.0, 1.0, 5.0, np.nan, np.nan]])
    assert nanmedian_rows(values).tolist() == [2.5, 3.0, 5.0]
    assert np.isnan(nanmedian_rows(np.zeros((3, 0)))).all()
    with pytest.raises(ValueError, match="2-D"):
        nanmedian_rows(np.zeros(5))
