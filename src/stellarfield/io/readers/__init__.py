"""Built-in readers; importing this package registers them all.

One module per survey format family; each calls :func:`stellarfield.io.registry.register_reader`
for the products it reads.
"""

from stellarfield.io.readers import apogee, gaia_xp, galah, lamost, lamost_mrs, miles, stelib  # noqa: F401
