"""Plain-text tables and byte counts for the CLI and the demo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_table", "human_bytes", "shorten"]


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, left: Sequence[str] = ()) -> str:
    """Rows as aligned columns under a header; ``left`` columns are left-aligned (text)."""
    if not rows:
        return "(no rows)"
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}

    def cell(column: str, value: Any) -> str:
        text = str(value)
        return text.ljust(widths[column]) if column in left else text.rjust(widths[column])

    lines = ["  ".join(cell(c, c) for c in columns), "  ".join("-" * widths[c] for c in columns)]
    lines += ["  ".join(cell(c, r.get(c, "")) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


def human_bytes(nbytes: int | float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(nbytes)


def shorten(text: str, width: int) -> str:
    """One line of at most ``width`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."
