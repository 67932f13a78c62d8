"""Byte sizes as people write them ("512M", "10G", "1.5GiB", "20GB", "0"): one parser, one meaning everywhere.

K, M, G and T are binary (powers of 1024), as KiB, MiB, GiB and TiB are; KB, MB, GB and TB are decimal
(powers of 1000), as disk makers count. Units are case-insensitive; a plain number is bytes. Every size
option takes this form: `kvstore serve --max-disk/--min-free-disk/--max-resident-bytes`, `--cache-size`
and KVSTORE_CACHE_SIZE, `kvstore.open(cache_size=...)` (issue 25: two parsers had read "10G" two ways).
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["parse_size"]

_UNITS = {
    "": 1,
    "b": 1,
    **{p: 1024**i for i, p in enumerate("kmgt", 1)},
    **{p + "ib": 1024**i for i, p in enumerate("kmgt", 1)},
    **{p + "b": 1000**i for i, p in enumerate("kmgt", 1)},
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int | None) -> int | None:
    """Bytes in `text` ("512M" = 512 x 2**20, "20GB" = 20 x 10**9, "1.5GiB", "0"); None stays None."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size must be >= 0 bytes, not {text}")
        return text
    m = _SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (bytes, or with a unit: 512M, 10G and 1.5GiB are binary, 20GB is 20 x 10^9)"
        )
    return int(Decimal(m.group(1)) * _UNITS[m.group(2).lower()])
