"""ULIDs: the internal ids of events and runs.

A ULID is 48 bits of milliseconds and 80 random bits in Crockford base32, so ids sort by creation
time. The generator here is monotonic: ids made in the same millisecond (or after the clock went
backwards) increment the random part, so sorting by id is sorting by creation order. That order
is what "newest first" listings rely on.
"""

from __future__ import annotations

import os
import random
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1


# Two base32 digits (10 bits) per lookup: half the work of a digit at a time.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _encode(value: int, length: int) -> str:
    """`value` as `length` (even) Crockford base32 digits."""
    out = [_PAIRS[(value >> shift) & 1023] for shift in range(5 * (length - 2), -1, -10)]
    return "".join(out)


def _encode_random(value: int) -> str:
    """The 80 random bits as 16 digits: `_encode(value, 16)` unrolled (twice as fast)."""
    p = _PAIRS
    return (p[value >> 70] + p[(value >> 60) & 1023] + p[(value >> 50) & 1023]
            + p[(value >> 40) & 1023] + p[(value >> 30) & 1023] + p[(value >> 20) & 1023]
            + p[(value >> 10) & 1023] + p[value & 1023])


class UlidGenerator:
    """Thread-safe monotonic ULID factory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0
        self._prefix = ""  # _last_ms encoded: ids made in the same millisecond share it
        # Seeded once from the OS: ids need uniqueness, not secrecy, and a syscall per id
        # would cost more than the rest of making one.
        self._rng = random.Random(os.urandom(32))

    def new(self, now_ms: int | None = None) -> str:
        """Return a ULID for `now_ms` (default: wall-clock time), greater than every earlier one."""
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        with self._lock:
            if ms <= self._last_ms:
                ms = self._last_ms
                rand = self._last_random + 1
                if rand > _RANDOM_MAX:  # 2**80 ids in one millisecond: borrow the next one
                    ms += 1
                    rand = self._rng.getrandbits(_RANDOM_BITS - 1)
            else:
                # Keep the top bit clear so increments within a millisecond never overflow.
                rand = self._rng.getrandbits(_RANDOM_BITS - 1)
            if ms != self._last_ms:
                self._prefix = _encode(ms, 10)
            self._last_ms, self._last_random = ms, rand
            prefix = self._prefix
        return prefix + _encode_random(rand)


_default = UlidGenerator()


def new_ulid(now_ms: int | None = None) -> str:
    """A new monotonic ULID from the process-wide generator."""
    return _default.new(now_ms)


def ulid_time_ms(ulid: str) -> int:
    """The millisecond timestamp encoded in a ULID."""
    value = 0
    for char in ulid[:10]:
        value = value * 32 + _ALPHABET.index(char)
    return value


def is_ulid(text: str) -> bool:
    """True when `text` is a well-formed ULID (26 Crockford base32 characters)."""
    return len(text) == 26 and text[0] in "01234567" and all(c in _ALPHABET for c in text)
