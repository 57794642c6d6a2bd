"""stellarfield: one generative model of stellar spectra, learned from many surveys at native resolution."""

from stellarfield.io import identify_format, read_spectra
from stellarfield.spectrum import Segment, Spectrum

__version__ = "0.1.0"
__all__ = ["Segment", "Spectrum", "identify_format", "read_spectra", "__version__"]
