"""Which characters are Han characters (CJK Unified Ideographs and their extensions)."""

from __future__ import annotations

# CJK Unified Ideographs, extension A, and extensions B-H (rare characters of old texts).
HAN_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2EBEF), (0x30000, 0x323AF),
)


def is_han(ch: str) -> bool:
    """True for a single Han character."""
    if len(ch) != 1:
        return False
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in HAN_RANGES)
