"""Readers for survey spectrum files, registered by name and detected from content.

``stellarfield.io.readers`` is the package of built-in readers; the function listing the registered
readers is :func:`stellarfield.io.registry.readers` (re-exporting it here would be shadowed by the
subpackage as soon as the readers load).
"""

from stellarfield.io.errors import SpectrumReadError, UnknownFormatError
from stellarfield.io.profile import ProductProfile
from stellarfield.io.registry import (
    get_reader,
    identify_format,
    product_profile,
    profiles,
    read_spectra,
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
    "register_reader",
    "unit_key",
]
