"""Converted weights are cached once, written so a half-written cache never counts as valid."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_dir(target: Path, is_valid: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a fresh folder beside ``target``; when the block succeeds it replaces ``target``.

    A concurrent writer may win the rename; that is fine as long as what it left is valid.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is world-readable
        for item in tmp.iterdir():
            os.chmod(item, 0o644)
        if target.exists():  # stale cache (older converter) or a concurrent writer
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_valid(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_valid(path: Path, source_file: str, converter_version: int, files: tuple[str, ...]) -> bool:
    """A cache folder counts only if its converter version matches and its files are all there."""
    import json

    try:
        meta = json.loads((path / source_file).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("converter_version") == converter_version and all((path / f).is_file() for f in files)
