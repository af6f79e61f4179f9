"""One module per published method. Importing this package registers them all."""

from . import baselines, dymu, evit, tome  # noqa: F401
