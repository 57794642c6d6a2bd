"""Built-in readers; importing this package registers them all.

One module per survey format family. Each module calls
:func:`stellarfield.io.registry.register_reader` for the products it reads.
"""

from importlib import import_module

for _module in ("apogee", "galah", "lamost", "miles", "gaia_xp"):
    try:
        import_module(f"stellarfield.io.readers.{_module}")
    except ModuleNotFoundError as exc:  # a reader module not yet written
        if exc.name != f"stellarfield.io.readers.{_module}":
            raise
