"""Parsing of numbers, sizes and rates given on the command line and in input files."""

from __future__ import annotations

import argparse
import re

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?(?:/s)?\s*$")


def parse_int(text: str) -> int:
    """A whole number in decimal or 0x-hex (``4096``, ``0x1000``; ``010`` is ten, not eight)."""
    text = text.strip()
    return int(text, 16 if text[:2].lower() == "0x" else 10)


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``256M``, ``1G``, ``2MiB``, ``10M/s`` → bytes (multiples of 1024)."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        m = _SIZE.match(text)
        if not m:
            raise ValueError(f"{text!r} is not a size (examples: 4096, 0x1000, 256M, 1G)") from None
        value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return value


def size_arg(text: str) -> int:
    """``parse_size`` for argparse: its message, not argparse's generic one."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds_arg(text: str) -> float:
    """A positive number of seconds, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} seconds is out of range")
    return value


def fraction_arg(text: str) -> float:
    """A fraction from 0 to 1, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction from 0 to 1")
    return value


def count_arg(text: str) -> int:
    """A whole number of at least 1, for argparse."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value
