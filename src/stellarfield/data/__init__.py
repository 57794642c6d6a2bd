"""The spectrum record, the dataset store and batching."""

from stellarfield.data.spectrum import LABEL_NAMES, Segment, Spectrum
from stellarfield.data.split import assign_split, split_counts
from stellarfield.data.store import Dataset, DatasetExistsError, DatasetWriter, NotADatasetError

__all__ = [
    "Segment",
    "Spectrum",
    "LABEL_NAMES",
    "Dataset",
    "DatasetWriter",
    "DatasetExistsError",
    "NotADatasetError",
    "assign_split",
    "split_counts",
]
