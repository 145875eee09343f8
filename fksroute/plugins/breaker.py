"""A circuit breaker for a plugin's venue: fail fast once it keeps failing, then let one trial through."""

from __future__ import annotations

import time
from typing import Callable

CIRCUIT_OPEN = "circuit_open"  # the error of an order refused because the circuit is open


class CircuitBreaker:
    """Opens after `threshold` consecutive failures, then lets one trial through once `cooldown` has passed."""

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self._clock = clock
        self._opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        """closed, open (failing fast) or half_open (a trial is due or running)."""
        if self._opened_at is None:
            return "closed"
        if self._trial or self._clock() - self._opened_at >= self.cooldown:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """Whether a call may go to the venue now; in half_open only the first caller gets through."""
        if self._opened_at is None:
            return True
        if self._trial or self._clock() - self._opened_at < self.cooldown:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self._opened_at = None
        self._trial = False

    def failed(self) -> None:
        self.failures += 1
        self._trial = False
        if self.failures >= self.threshold:
            self._opened_at = self._clock()

    def released(self) -> None:
        """The call taught nothing about the venue (refused before sending, dry run)."""
        self._trial = False
