"""The spectrum record, the dataset store and batching."""

from stellarfield.data.spectrum import LABEL_NAMES, Segment, Spectrum

__all__ = ["Segment", "Spectrum", "LABEL_NAMES"]
