"""A token bucket: how much a client may send per second, with a burst allowance."""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    """Allows `rate` units per second on average and `burst` units at once."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = burst
        self.at = clock()

    def take(self, amount: float) -> bool:
        """Spend `amount` if the bucket holds it; False (nothing spent) when it does not."""
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if amount > self.level:
            return False
        self.level -= amount
        return True
