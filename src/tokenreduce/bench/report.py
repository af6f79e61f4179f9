"""Reports: one JSON line per measured configuration, and a Markdown table over the same rows.

Generic on purpose (the ViT, KV-cache and VLM benchmarks share it): a report is a list of
flat-ish ``dict`` rows plus a column spec saying which keys the table shows and how. The
JSON lines keep every field of every row; the table is a view.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["Column", "to_jsonable", "write_jsonl", "read_jsonl", "markdown_table", "write_markdown", "sort_rows"]


@dataclass(frozen=True)
class Column:
    """One table column: ``key`` of the row, ``header`` shown, ``fmt`` a format spec or a callable.

    Missing keys and ``None`` print as ``missing`` (default "—"), so rows of different
    kinds (the full model has no calibration time) share one table.
    """

    key: str
    header: str | None = None
    fmt: str | Callable[[Any], str] = ""
    missing: str = "—"

    def render(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return self.missing
        if callable(self.fmt):
            text = self.fmt(value)
        elif self.fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
            text = format(value, self.fmt)
        else:
            text = str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    @property
    def title(self) -> str:
        return self.header if self.header is not None else self.key


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy scalars/arrays, tuples, Paths and dataclass-like objects -> JSON types."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    return repr(value)


def write_jsonl(rows: Iterable[dict], path: str | Path, append: bool = False) -> Path:
    """One JSON object per line. ``append=True`` adds to an existing file (e.g. row by row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(to_jsonable(row), sort_keys=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A GitHub Markdown table; numbers right-aligned, text left-aligned."""
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    cells = [[c.render(r) for c in columns] for r in rows]
    def is_number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    present = [[r.get(c.key) for r in rows if r.get(c.key) is not None] for c in columns]
    numeric = [bool(vals) and all(is_number(v) for v in vals) for vals in present]
    widths = [max([len(c.title), 3] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if num else v.ljust(w)
                                 for v, w, num in zip(values, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else (":" + "-" * (w + 1))
                          for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line([c.title for c in columns]), rule] + [line(row) for row in cells])


def write_markdown(rows: Sequence[dict], columns: Sequence[Column], path: str | Path, title: str | None = None,
                   notes: Sequence[str] = ()) -> Path:
    """The table, under an optional ``# title``, followed by optional note lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}\n"] if title else []
    parts.append(markdown_table(rows, columns) + "\n")
    if notes:
        parts.append("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def sort_rows(rows: Iterable[dict], first: Callable[[dict], bool] | None = None,
              keys: Sequence[str] = ()) -> list[dict]:
    """Rows for which ``first(row)`` holds come first (in their order), then the rest sorted by ``keys``.

    A key written ``"-name"`` sorts that (numeric) field descending. ``None`` sorts before
    any value, so incomplete rows do not raise.
    """
    rows = list(rows)
    head = [r for r in rows if first is not None and first(r)]
    tail = [r for r in rows if not (first is not None and first(r))]

    def part(r, k):
        desc = k.startswith("-")
        v = r.get(k[1:] if desc else k)
        if v is None:
            return (0, 0)
        return (1, -v if desc else v)

    def key(r):
        return tuple(part(r, k) for k in keys)

    return head + sorted(tail, key=key)
