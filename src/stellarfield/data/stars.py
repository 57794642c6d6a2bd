"""One star, many spectra: a canonical ``star_id`` across surveys, products and telescopes.

Each survey names its stars its own way: MILES writes ``HD044691A`` or ``HD 030210``, STELIB
``HD015318`` in its file names and ``HR718`` or ``HD26630`` in its headers, APOGEE and its Gaia XP
cross-match ``2M00452143+1634446``, LAMOST a designation built from its input-catalogue position
(``LAMOST J192814.09+435531.0``), which differs by a fraction of an arcsecond between the plans that
observed one star. A spectrum keeps its survey's own ids (``object_id``, ``observation_id``); this
module gives it a canonical ``star_id`` so that every spectrum of one star shares it, and with it
one train/validation/test split (:func:`stellarfield.data.split.split_id`).

Names
    :func:`normalise_name` writes a catalogue designation one way: catalogue prefix, the number
    without zero padding, BD/CD/CPD zones with their sign and two digits, a component letter apart
    (``HD044691A`` and ``HD 44691 A`` -> ``"HD 44691 A"``; ``BD+002058A`` -> ``"BD+00 2058 A"``;
    ``G004-036`` -> ``"G 4-36"``; ``HR718`` -> ``"HR 718"``). A name of no known catalogue (cluster
    star numbers such as ``M71 1-37``) gives None and identifies nothing. A name without a component
    letter denotes the system's primary, so component A is the same star as the bare name: the
    candidate ``star_id`` drops an ``A`` (MILES' ``HD048682`` is STELIB's ``HD048682A``: their spectra
    agree to 2.7% rms, against 12% for ``HD048682B``), while B, C, D stay apart.

Positions
    Where a record gives a position (``meta["ra_deg"]``, ``meta["dec_deg"]``: ICRS / J2000 degrees,
    LAMOST and STELIB headers), records within :data:`MATCH_RADIUS_ARCSEC` of each other are the
    same star. LAMOST's designations of one star differ by up to 1.4 arcsec; 3 arcsec is far below
    the separation of two fibres' targets and above those differences.

Resolution (:func:`resolve_star_ids`)
    Records that share a name (after normalisation, with the A-component rule) or lie within the
    match radius are one star (transitively). The star's id is the best of its members' candidate
    names: the most preferred catalogue (:data:`CATALOGUE_RANK`: HD first, then HR, BD, ... and
    position-built designations last), then the name most records carry, then the alphabetically
    first. Records with neither a name nor a position get None (the split then uses ``object_id``).

The candidate ids keep the forms the surveys already use where they can (APOGEE's ``2M...``,
LAMOST's designation), so resolving identities leaves the split of a star seen by one product
unchanged wherever its ``object_id`` already was such a name.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

#: Records closer than this (arcsec) are the same star.
MATCH_RADIUS_ARCSEC = 3.0
#: Catalogues in order of preference for a star's id (a name of an earlier one wins).
CATALOGUE_RANK = ("HD", "HR", "BD", "CD", "CPD", "HIP", "G", "LHS", "LTT", "Feige", "KIC", "2MASS", "Gaia",
                  "LAMOST", "J")
#: ``meta`` keys whose values are names of the star (comma-separated where several).
NAME_META_KEYS = ("star_name", "star_aliases", "desig")

_COMPONENT = r"(?:\s*([A-D]))?"
_PATTERNS: list[tuple[str, re.Pattern, object]] = [
    ("HD", re.compile(r"^HDE?\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"HD {int(m[1])}"),
    ("HR", re.compile(r"^HR\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"HR {int(m[1])}"),
    # BD/CD/CPD with a space between zone and number: "BD+00 2058", "CD -24 15398"
    ("BD", re.compile(r"^(BD|CD|CPD)\s*([+-])\s*(\d{1,2})\s+0*(\d+)" + _COMPONENT + "$"),
     lambda m: f"{m[1]}{m[2]}{int(m[3]):02d} {int(m[4])}"),
    # ... and written together, the zone in two digits: "BD+002058", "CD-2415398"
    ("BD", re.compile(r"^(BD|CD|CPD)\s*([+-])(\d{2})0*(\d+)" + _COMPONENT + "$"),
     lambda m: f"{m[1]}{m[2]}{m[3]} {int(m[4])}"),
    ("HIP", re.compile(r"^HIP\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"HIP {int(m[1])}"),
    ("G", re.compile(r"^G\s*0*(\d+)\s*-\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"G {int(m[1])}-{int(m[2])}"),
    ("LHS", re.compile(r"^LHS\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"LHS {int(m[1])}"),
    ("LTT", re.compile(r"^LTT\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"LTT {int(m[1])}"),
    ("Feige", re.compile(r"^FEIGE\s*0*(\d+)" + _COMPONENT + "$"), lambda m: f"Feige {int(m[1])}"),
    ("KIC", re.compile(r"^KIC\s*0*(\d+)$"), lambda m: f"KIC {int(m[1])}"),
    ("2MASS", re.compile(r"^2M(?:ASS)?\s*J?\s*(\d{8}[+-]\d{7})$"), lambda m: f"2M{m[1]}"),
    ("Gaia", re.compile(r"^GAIA\s*(DR\d|EDR3)\s*(\d+)$"), lambda m: f"Gaia {m[1]} {int(m[2])}"),
    ("LAMOST", re.compile(r"^LAMOST\s*J\s*(\d{6}\.\d{2}[+-]\d{6}\.\d)$"), lambda m: f"LAMOST J{m[1]}"),
    ("J", re.compile(r"^J\s*(\d{6}\.\d{2}[+-]\d{6}\.\d)$"), lambda m: f"J{m[1]}"),
]
_RANK = {name: i for i, name in enumerate(CATALOGUE_RANK)}
# Every pattern starts with a literal letter (or "2"): a name is tried only against the patterns
# that can match its first character, in the order of _PATTERNS.
_FIRST_CHARS = {"HD": "H", "HR": "H", "BD": "BCD", "HIP": "H", "G": "G", "LHS": "L", "LTT": "L", "Feige": "F",
                "KIC": "K", "2MASS": "2", "Gaia": "G", "LAMOST": "L", "J": "J"}
# (catalogue, pattern, canonical, whether the pattern ends in a component letter) by first character
_PATTERNS_BY_FIRST: dict[str, list] = {}
for _entry in _PATTERNS:
    for _char in _FIRST_CHARS[_entry[0]]:
        _PATTERNS_BY_FIRST.setdefault(_char, []).append((*_entry, _entry[1].pattern.endswith(_COMPONENT + "$")))


def _parse(name: str) -> tuple[str, str, str] | None:
    """(catalogue, canonical name without component, component letter or "") of a name, or None."""
    if name is None:
        return None
    text = " ".join(str(name).upper().split())
    for catalogue, pattern, canonical, has_component in _PATTERNS_BY_FIRST.get(text[:1], ()):
        match = pattern.match(text)
        if match:
            component = match.groups()[-1] if has_component else None
            return catalogue, canonical(match), component or ""
    return None


def normalise_name(name: str | None) -> str | None:
    """The canonical form of a catalogue designation, or None if it is not one this module knows.

    >>> normalise_name("HD044691A"), normalise_name("HD 030210"), normalise_name("HR718")
    ('HD 44691 A', 'HD 30210', 'HR 718')
    >>> normalise_name("BD+002058A"), normalise_name("CD-2415398"), normalise_name("G004-036")
    ('BD+00 2058 A', 'CD-24 15398', 'G 4-36')
    >>> normalise_name("M71 1-37") is None
    True
    """
    parsed = _parse(name)
    if parsed is None:
        return None
    _, base, component = parsed
    return f"{base} {component}" if component else base


def candidate_id(name: str | None) -> str | None:
    """The ``star_id`` a name stands for: its canonical form, without an ``A`` component (the primary)."""
    parsed = _parse(name)
    if parsed is None:
        return None
    _, base, component = parsed
    return base if component in ("", "A") else f"{base} {component}"


def catalogue_of(star_id: str) -> str | None:
    parsed = _parse(star_id)
    return parsed[0] if parsed else None


def coordinate_id(ra_deg: float, dec_deg: float) -> str:
    """An IAU-style position designation, truncated: ``"J192814.09+435531.0"`` for (292.058716, 43.925304)."""
    centi_s = math.floor((float(ra_deg) % 360.0) / 15.0 * 360000.0 + 1e-6)  # RA in 0.01 s of time
    h, m, s = centi_s // 360000, (centi_s // 6000) % 60, centi_s % 6000
    deci_as = math.floor(abs(float(dec_deg)) * 36000.0 + 1e-6)  # |Dec| in 0.1 arcsec
    d, dm, ds = deci_as // 36000, (deci_as // 600) % 60, deci_as % 600
    sign = "-" if dec_deg < 0 else "+"
    return f"J{h:02d}{m:02d}{s // 100:02d}.{s % 100:02d}{sign}{d:02d}{dm:02d}{ds // 10:02d}.{ds % 10}"


@dataclass(frozen=True)
class StarIdentity:
    """What one record says about which star it is.

    candidates:
        Candidate star ids from the record's names (:func:`candidate_id`), best first.
    link_names:
        Every normalised name (with and without an A component) that links it to other records.
    ra_deg, dec_deg:
        Position (ICRS / J2000 degrees), NaN if the record gives none.
    """

    candidates: tuple[str, ...]
    link_names: frozenset[str]
    ra_deg: float = float("nan")
    dec_deg: float = float("nan")

    @property
    def has_position(self) -> bool:
        return math.isfinite(self.ra_deg) and math.isfinite(self.dec_deg)

    @property
    def star_id(self) -> str | None:
        """The record's own best id: its best name, else its position designation, else None."""
        if self.candidates:
            return self.candidates[0]
        if self.has_position:
            return coordinate_id(self.ra_deg, self.dec_deg)
        return None


def _names_of(spectrum) -> list[str]:
    """Names a record gives of its star, in the order they are trusted."""
    names: list[str] = []
    if spectrum.star_id:
        names.append(spectrum.star_id)
    names.append(spectrum.object_id)
    for key in NAME_META_KEYS:
        value = spectrum.meta.get(key)
        if isinstance(value, str) and value.strip():
            for part in value.split(","):
                # MILES' table flags cluster members with a trailing "Cl" after the name
                names.append(re.sub(r"\s{2,}Cl$", "", part.strip()))
    return names


def identity_of(spectrum) -> StarIdentity:
    """The names and position a record gives (see the module docstring)."""
    candidates: list[str] = []
    links: set[str] = set()
    for name in _names_of(spectrum):
        parsed = _parse(name)
        if parsed is None:
            continue
        catalogue, base, component = parsed
        candidate = base if component in ("", "A") else f"{base} {component}"
        if candidate not in candidates:
            candidates.append(candidate)
        links.add(candidate)
    if spectrum.star_id and spectrum.star_id not in candidates:
        # a reader's own id that no pattern knows still identifies the star
        candidates.insert(0, spectrum.star_id)
        links.add(spectrum.star_id)
    # best catalogue first; equal catalogues keep the order of trust (reader's id, object_id, meta)
    if len(candidates) > 1:
        order = {c: i for i, c in enumerate(candidates)}
        candidates.sort(key=lambda c: (_RANK.get(catalogue_of(c) or "", len(_RANK)), order[c]))
    ra, dec = _float(spectrum.meta.get("ra_deg")), _float(spectrum.meta.get("dec_deg"))
    return StarIdentity(tuple(candidates), frozenset(links), ra, dec)


def _float(value) -> float:
    if value is None:  # most records give no position: no exception to raise and catch
        return float("nan")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) else float("nan")


def resolve_star_ids(
    identities: Mapping[str, StarIdentity], *, radius_arcsec: float = MATCH_RADIUS_ARCSEC
) -> dict[str, str | None]:
    """``{record key: star_id}``: records sharing a name or within ``radius_arcsec`` are one star.

    The star's id is its members' best candidate name (catalogue rank, then the name most members
    carry, then alphabetical), else the most common position designation among its members.
    """
    keys = list(identities)
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first_with: dict[str, int] = {}
    for i, key in enumerate(keys):
        for name in identities[key].link_names:
            union(i, first_with.setdefault(name, i))

    located = [i for i, key in enumerate(keys) if identities[key].has_position]
    if len(located) > 1:
        from scipy.spatial import cKDTree

        ra = np.radians([identities[keys[i]].ra_deg for i in located])
        dec = np.radians([identities[keys[i]].dec_deg for i in located])
        xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
        chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
        for a, b in cKDTree(xyz).query_pairs(chord):
            union(located[a], located[b])

    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(keys)):
        groups[find(i)].append(i)
    out: dict[str, str | None] = {}
    for members in groups.values():
        if len(members) == 1 and len(identities[keys[members[0]]].candidates) == 1:
            out[keys[members[0]]] = identities[keys[members[0]]].candidates[0]  # alone, one name (most records)
            continue
        counts: Counter[str] = Counter()
        for i in members:
            counts.update(set(identities[keys[i]].candidates))
        if len(counts) == 1:  # the one candidate (the most common case: nothing to rank)
            best = next(iter(counts))
        elif counts:
            best = min(counts, key=lambda c: (_RANK.get(catalogue_of(c) or "", len(_RANK)), -counts[c], c))
        else:
            own = Counter(identities[keys[i]].star_id for i in members)
            own.pop(None, None)
            best = min(own, key=lambda c: (-own[c], c)) if own else None
        for i in members:
            out[keys[i]] = best
    return out


def assign_star_ids(spectra: Iterable, *, radius_arcsec: float = MATCH_RADIUS_ARCSEC) -> list:
    """Set ``star_id`` on every record of ``spectra`` (in place) by resolving them together; returns the list."""
    records = list(spectra)
    identities = {f"{i}": identity_of(s) for i, s in enumerate(records)}
    resolved = resolve_star_ids(identities, radius_arcsec=radius_arcsec)
    for i, s in enumerate(records):
        s.star_id = resolved[f"{i}"]
    return records


def stars_in_several_products(rows: Iterable[Mapping], min_products: int = 2) -> list[dict]:
    """Stars whose spectra come from at least ``min_products`` products.

    ``rows`` are mappings with ``star_id`` (or None), ``object_id`` and ``product`` (dataset rows,
    e.g. ``Dataset.table([...]).to_pylist()``). A row without a star id stands for its ``object_id``.
    Returns one dict per star, sorted by id: ``star_id``, ``products`` ({product: spectra}),
    ``object_ids`` (sorted).
    """
    products: dict[str, Counter] = defaultdict(Counter)
    object_ids: dict[str, set] = defaultdict(set)
    for row in rows:
        star = row.get("star_id") or row["object_id"]
        products[star][row["product"]] += 1
        object_ids[star].add(row["object_id"])
    return [
        {"star_id": star, "products": dict(sorted(products[star].items())), "object_ids": sorted(object_ids[star])}
        for star in sorted(products)
        if len(products[star]) >= min_products
    ]


def format_star_table(stars: list[dict], *, max_ids: int = 4) -> str:
    """A text table of :func:`stars_in_several_products`'s result, with the count of pairs per product pair."""
    pairs: Counter[tuple[str, str]] = Counter()
    for star in stars:
        names = sorted(star["products"])
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                pairs[(names[a], names[b])] += 1
    lines = [f"stars seen by two or more products: {len(stars)}"]
    for (a, b), n in sorted(pairs.items()):
        lines.append(f"  {a} + {b}: {n} stars")
    if stars:
        width = max(len("star_id"), *(len(s["star_id"]) for s in stars))
        lines.append(f"  {'star_id':<{width}}  spectra per product; object ids")
        for star in stars:
            per_product = ", ".join(f"{p} {n}" for p, n in star["products"].items())
            ids = star["object_ids"]
            shown = ", ".join(ids[:max_ids]) + (f", ... ({len(ids)} ids)" if len(ids) > max_ids else "")
            lines.append(f"  {star['star_id']:<{width}}  {per_product}; {shown}")
    return "\n".join(lines)


def describe_dataset_stars(dataset, *, max_ids: int = 4) -> str:
    """The text ``stellarfield info DATASET --stars`` prints: stars seen by two or more products."""
    table = dataset.table(["star_id", "object_id", "product"])
    rows = table.to_pylist()
    text = format_star_table(stars_in_several_products(rows), max_ids=max_ids)
    if rows and all(row["star_id"] is None for row in rows):
        text += ("\n  (this dataset was written before star ids: stars are its object ids; "
                 "ingest its sources again to link stars across products)")
    return text
