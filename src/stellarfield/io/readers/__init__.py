"""Built-in readers; importing this package registers them all.

One module per survey format family; each declares the
:class:`~stellarfield.io.profile.ProductProfile` of every product it reads and calls
:func:`stellarfield.io.registry.register_reader` with them. Adding a product is one reader module (or
one reader in a module) and its profile: the observation model, the bench, the demo and the read
checks find everything else in the profile.
"""

from stellarfield.io.readers import apogee, gaia_xp, galah, lamost, lamost_mrs, miles, stelib  # noqa: F401
