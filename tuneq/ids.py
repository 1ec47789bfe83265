"""Object ids that sort by creation time: `job-01JD...`, `file-01JD...`.

A 48-bit millisecond timestamp and 80 random bits in Crockford base32 (the ULID layout),
so "newest first" and cursor pagination are an ORDER BY on the primary key.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return f"{prefix}-{''.join(reversed(chars))}"
