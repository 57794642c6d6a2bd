"""Datasets of spectra: the Parquet store, the split by star, star identities across surveys.

The record itself, :class:`~stellarfield.spectrum.Spectrum`, sits below (``stellarfield.spectrum``);
ingest, which reads survey files (``stellarfield.io``) into a dataset, sits above (``stellarfield.ingest``).
"""

from stellarfield.data.split import assign_split, split_counts
from stellarfield.data.store import Dataset, DatasetExistsError, DatasetWriter, NotADatasetError

__all__ = [
    "Dataset",
    "DatasetWriter",
    "DatasetExistsError",
    "NotADatasetError",
    "assign_split",
    "split_counts",
]
