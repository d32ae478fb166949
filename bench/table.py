"""How the benchmarks print their tables: a number in a column, a ratio."""

from __future__ import annotations

__all__ = ["cell", "ratio"]


def cell(value: float | None, width: int, fmt: str = ".0f") -> str:
    """``value`` right-aligned in ``width`` columns, or ``-`` if it was not measured."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def ratio(value: float | None, width: int = 6) -> str:
    """``value`` as ``1.23x`` right-aligned in ``width`` columns, or ``-``."""
    return f"{'-':>{width}}" if value is None else f"{value:.2f}x".rjust(width)
