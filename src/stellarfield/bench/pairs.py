"""The ``pairs`` section of ``stellarfield bench``: the measurements of :mod:`stellarfield.eval.pairs`
on the bench's test spectra."""

from __future__ import annotations

import os
from collections.abc import Sequence

from stellarfield.bench.sections import PairsResult
from stellarfield.eval.pairs import (
    MULTI_EPOCH_PRODUCT,
    MULTI_EPOCH_STAR,
    load_star,
    multi_epoch_section,
    pairs_from_spectra,
    pairs_section,
    random_distance,
)


def bench_section(model, datasets: Sequence[str | os.PathLike], test_spectra: dict[str, list],
                  refine_steps: int = 100, seed: int = 0) -> PairsResult:
    """The ``pairs`` section of ``stellarfield bench``: the pairs among the bench's test spectra (all
    STELIB + MILES stars of the test split unless the bench's cap dropped one of a star's two), and
    the multi-epoch star where ``datasets`` hold it (any split)."""
    pairs = pairs_section(model, split="test", refine_steps=refine_steps, seed=seed,
                          pairs=pairs_from_spectra(test_spectra))
    spectra = load_star(datasets, MULTI_EPOCH_STAR, MULTI_EPOCH_PRODUCT)
    if not spectra:
        return PairsResult(pairs, multi_epoch_note=f"not done: no {MULTI_EPOCH_PRODUCT} spectrum of {MULTI_EPOCH_STAR}")
    epochs = multi_epoch_section(model, spectra, random_distance(pairs), refine_steps)
    return PairsResult(pairs, star_id=MULTI_EPOCH_STAR, multi_epoch=epochs)
