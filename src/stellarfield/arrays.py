"""Array helpers shared by the model (noise, training-data scales) and the evaluation code (metrics, probes)."""

from __future__ import annotations

import numpy as np


def nanmedian_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row of a 2-D array over its non-NaN values (NaN for a row without any).

    The same numbers as ``np.nanmedian(values, axis=1)`` (the mean of the two middle values for an
    even count), without its per-row Python loop over rows that hold a NaN: one sort, which puts
    NaN last, then each row's middle values by its count. 4-17x faster on generated batches
    (50,000 x 343 and 2,000 x 16,384 values), which made the noise of ``generate --snr`` cost as
    much as drawing the latents.
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"nanmedian_rows takes a 2-D array, got shape {values.shape}")
    if values.shape[1] == 0:
        return np.full(values.shape[0], np.nan, dtype=np.result_type(values.dtype, np.float32))
    ordered = np.sort(values, axis=1)
    count = (~np.isnan(ordered)).sum(axis=1)
    low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[:, None], axis=1)[:, 0]
    high = np.take_along_axis(ordered, np.minimum(count // 2, values.shape[1] - 1)[:, None], axis=1)[:, 0]
    return np.where(count > 0, 0.5 * (low + high), np.nan)
