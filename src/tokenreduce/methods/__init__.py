"""One module per published method. Importing this package registers them all."""

from . import baselines, dymu, evit, mctf, token_transforming, tome  # noqa: F401
