"""Deterministic train / validation / test split by star.

Every observation of one star must land in the same split, or a model could be validated on a
star it was trained on (a visit and the combined spectrum of the same star are nearly the same
data). The split is therefore a function of the star's id alone (:func:`split_id`: the record's
canonical ``star_id``, or its ``object_id`` where no star id is known), computed from a
cryptographic hash so that it is the same on every run, machine and Python version (Python's
built-in ``hash()`` of a string is randomised per process and must never be used for this).

Definition (version 1)::

    message = (salt + "/" + object_id.strip()).encode("utf-8")
    u       = int.from_bytes(blake2b(message, digest_size=8).digest(), "big") / 2**64   # in [0, 1)
    split   = "train"       if u < f_train
              "validation"  if u < f_train + f_validation
              "test"        otherwise

BLAKE2b is specified in RFC 7693 and ships with Python's :mod:`hashlib`. Its output bits are
uniformly distributed, so ``u`` is uniform on [0, 1) and each split receives its fraction of the
stars (not of the spectra: a star with many visits brings them all along).

The split is only as good as the star ids. A survey's own ``object_id`` differs between surveys
(a MILES number, a STELIB file name, a LAMOST designation that moves by an arcsecond between
plans), so records carry a canonical ``star_id`` (:mod:`stellarfield.data.stars`: normalised
catalogue names and position matches, resolved over a whole dataset when it is written), and the
split is drawn from it: MILES and STELIB spectra of one HD star, or LAMOST LRS and MRS spectra of
one star, share a split. A star seen under two ids that neither names nor positions link (a
``sobject_id`` in GALAH and a 2MASS id in APOGEE) still lands in two independent splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

#: Split names, in the order the fractions are given.
SPLITS = ("train", "validation", "test")
#: Default fractions of stars in (train, validation, test).
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
#: Default salt; changing it draws a new, independent split.
DEFAULT_SALT = "stellarfield-split-v1"


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS):
        raise ValueError(f"fractions must give {len(SPLITS)} values for {SPLITS}, got {fractions!r}")
    if any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions!r}")
    return values  # type: ignore[return-value]


def split_uniform(object_id: str, *, salt: str = DEFAULT_SALT) -> float:
    """The number in [0, 1) that decides ``object_id``'s split (see the module docstring)."""
    message = f"{salt}/{object_id.strip()}".encode("utf-8")
    digest = hashlib.blake2b(message, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_split(
    object_id: str,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    salt: str = DEFAULT_SALT,
) -> str:
    """The split (``"train"``, ``"validation"`` or ``"test"``) of the star ``object_id``.

    Deterministic: the same id, fractions and salt always give the same split. Leading and
    trailing whitespace of the id is ignored (FITS header strings are often padded).

    >>> assign_split("2M00452143+1634446")
    'train'
    """
    return split_assigner(fractions=fractions, salt=salt)(object_id)


def split_assigner(
    *, fractions: Sequence[float] = DEFAULT_FRACTIONS, salt: str = DEFAULT_SALT
) -> Callable[[str], str]:
    """:func:`assign_split` as a function of the id alone, the fractions checked once (for
    assigning the splits of many ids: a dataset writer calls it once per row)."""
    f_train, f_validation, _ = _check_fractions(fractions)

    def assign(object_id: str) -> str:
        u = split_uniform(object_id, salt=salt)
        if u < f_train:
            return "train"
        if u < f_train + f_validation:
            return "validation"
        return "test"

    return assign


def split_id(spectrum) -> str:
    """The id a record's split is drawn from: its ``star_id``, else its ``object_id``."""
    star_id = getattr(spectrum, "star_id", None)
    return star_id if star_id else spectrum.object_id


def split_of(
    spectrum,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    salt: str = DEFAULT_SALT,
) -> str:
    """The split of a record: :func:`assign_split` of its :func:`split_id`."""
    return assign_split(split_id(spectrum), fractions=fractions, salt=salt)


def split_counts(
    object_ids: Iterable[str],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    salt: str = DEFAULT_SALT,
) -> dict[str, int]:
    """Number of ids in each split (every split name present, possibly with 0).

    Each id is counted as given: pass unique star ids to count stars, or one id per spectrum to
    count spectra.
    """
    counts = {name: 0 for name in SPLITS}
    for object_id in object_ids:
        counts[assign_split(object_id, fractions=fractions, salt=salt)] += 1
    return counts
