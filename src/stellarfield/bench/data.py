"""The spectra a benchmark run uses: one split of one or several datasets, capped per product.

Every number in ``stellarfield bench`` is scored on the **test** split; baselines and label probes
are fitted on the **train** split. Splits are assigned by star when a dataset is written
(:mod:`stellarfield.data.split`), so no star of the test split is in the train split.

Several datasets may hold the same spectrum (MILES ingested from ``../shared/data`` and from the
demo extra): a key seen in an earlier dataset is skipped, as in training
(:func:`stellarfield.model.train.train`). A product with more spectra than the cap is reduced to a
random subset of that size, drawn with ``numpy.random.default_rng(seed)`` from its sorted keys, so
the same datasets, cap and seed always give the same spectra.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stellarfield.data.store import Dataset
from stellarfield.spectrum import Spectrum


@dataclass
class SplitSelection:
    """Spectra of one split per product, and how many there were before the cap."""

    split: str
    spectra: dict[str, list[Spectrum]] = field(default_factory=dict)
    available: dict[str, int] = field(default_factory=dict)

    def keys(self) -> dict[str, list[str]]:
        return {product: [s.key for s in spectra] for product, spectra in self.spectra.items()}

    def counts(self) -> dict[str, int]:
        return {product: len(spectra) for product, spectra in self.spectra.items()}


def _chosen_keys(keys: list[str], cap: int | None, rng: np.random.Generator) -> set[str]:
    """All keys, or a random subset of ``cap`` of them (drawn from the sorted keys)."""
    if cap is None or len(keys) <= cap:
        return set(keys)
    ordered = sorted(keys)
    return {ordered[i] for i in rng.choice(len(ordered), size=cap, replace=False)}


def load_split(
    datasets: Sequence[str | os.PathLike],
    split: str,
    max_per_product: int | dict[str, int] | None = None,
    seed: int = 0,
    products: Sequence[str] | None = None,
) -> SplitSelection:
    """Spectra of ``split`` from ``datasets`` (duplicated keys once), at most ``max_per_product`` per
    product (one cap for all, or ``{product: cap}`` with no cap for the products it does not name; see
    the module docstring), optionally only of ``products``.

    The keys are read first (one small column), the subset is chosen, and only the chosen spectra
    are then decoded, so a 30,000-spectrum product costs little when the cap is small.
    """
    stores = [Dataset(path) for path in datasets]
    owner: dict[str, int] = {}  # key -> index of the first dataset holding it
    by_product: dict[str, list[str]] = {}
    for index, store in enumerate(stores):
        table = store.table(["key", "product"], split=split, products=products)
        for key, product in zip(table.column("key").to_pylist(), table.column("product").to_pylist()):
            if key not in owner:
                owner[key] = index
                by_product.setdefault(product, []).append(key)

    rng = np.random.default_rng(seed)
    selection = SplitSelection(split)
    wanted: set[str] = set()
    for product in sorted(by_product):
        keys = by_product[product]
        selection.available[product] = len(keys)
        cap = max_per_product.get(product) if isinstance(max_per_product, dict) else max_per_product
        wanted |= _chosen_keys(keys, cap, rng)

    for index, store in enumerate(stores):
        names = sorted({p for p, keys in by_product.items() if any(owner[k] == index and k in wanted for k in keys)})
        if not names:
            continue
        for spectrum in store.iter_spectra(split=split, products=names):
            if spectrum.key in wanted and owner[spectrum.key] == index:
                selection.spectra.setdefault(spectrum.product, []).append(spectrum)
    selection.spectra = {p: selection.spectra[p] for p in sorted(selection.spectra)}
    return selection
