"""Readers for survey spectrum files, registered by name and detected from content."""

from stellarfield.io.errors import SpectrumReadError, UnknownFormatError
from stellarfield.io.profile import ProductProfile
from stellarfield.io.registry import (
    get_reader,
    identify_format,
    product_profile,
    profiles,
    read_spectra,
    readers,
    register_reader,
    unit_key,
)

__all__ = [
    "ProductProfile",
    "SpectrumReadError",
    "UnknownFormatError",
    "get_reader",
    "identify_format",
    "product_profile",
    "profiles",
    "read_spectra",
    "readers",
    "register_reader",
    "unit_key",
]
