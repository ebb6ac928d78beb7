"""Parsing of memory sizes given by users: ints (bytes) or strings like "20GiB", "512MB"."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object, name: str) -> int | None:
    """Bytes from an int, a float, or a string with a unit (B, KB/MB/GB/TB in powers of 1000,
    KiB/MiB/GiB/TiB in powers of 1024). None stays None (no budget).

    Raises:
        TypeError: not an int, float or string.
        ValueError: unparsable, unknown unit, negative, or zero; the message names `name`.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a size in bytes (int) or a string like '20GiB', got bool")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if not match:
            raise ValueError(f"{name}={value!r} is not a size; write e.g. '20GiB', '512MB' or 1073741824")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise ValueError(f"{name}={value!r} has an unknown unit {match.group(2)!r}; use B, KB, MB, "
                             "GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
    else:
        raise TypeError(f"{name} must be a size in bytes (int) or a string like '20GiB', "
                        f"got {type(value).__name__}")
    if not number == number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name}={value!r} must be a finite size")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be a positive size")
    return size
