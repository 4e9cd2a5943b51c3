"""Byte quantities: parse what users type (`8GB`, `8GiB`, `300MB`, `123456`) and print them back."""

import re

from qra.errors import QraError

_DECIMAL = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_BINARY = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_PATTERN = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")


def parse_bytes(text: str, what: str = "budget") -> int:
    """Parse a positive byte quantity; SI units are powers of 10, IEC units (GiB) powers of 2."""
    match = _PATTERN.match(str(text))
    hint = f"give {what} as a positive size such as 8GB, 8GiB, 300MB or a number of bytes"
    if match is None:
        raise QraError(f"{what} {text!r} is not a size: {hint}")
    unit = match["unit"].upper()
    factor = _DECIMAL.get(unit) or _BINARY.get(unit)
    if factor is None:
        raise QraError(f"{what} {text!r} has an unknown unit {match['unit']!r}: {hint}")
    value = int(float(match["number"]) * factor)
    if value <= 0:
        raise QraError(f"{what} {text!r} must be more than zero: {hint}")
    return value


def format_bytes(n: int | float) -> str:
    """Human-readable size in decimal units (what GPU vendors print on the box)."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= factor:
            return f"{sign}{n / factor:.2f} {unit}"
    return f"{sign}{int(n)} B"


def format_seconds(seconds: float) -> str:
    """A duration as `1h02m`, `12m05s` or `45s`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
