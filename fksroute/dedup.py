"""Remember accepted alerts for their dedup window, so a resent alert is not executed again."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    """The first delivery of an alert; `reply` resolves to its answer (status, body)."""

    alert_id: str
    expires: float
    reply: asyncio.Future = field(repr=False)


class DedupCache:
    def __init__(self) -> None:
        self._seen: OrderedDict[str, Seen] = OrderedDict()

    def get(self, key: str, now: float | None = None) -> Seen | None:
        now = time.time() if now is None else now
        seen = self._seen.get(key)
        if seen is not None and seen.expires <= now:
            del self._seen[key]
            return None
        return seen

    def add(self, key: str, alert_id: str, window: float, reply: asyncio.Future, now: float | None = None) -> Seen:
        now = time.time() if now is None else now
        self._prune(now)
        seen = Seen(alert_id, now + window, reply)
        self._seen[key] = seen
        self._seen.move_to_end(key)
        return seen

    def forget(self, key: str, alert_id: str) -> None:
        """Drop an entry whose alert was not accepted after all (the journal failed)."""
        seen = self._seen.get(key)
        if seen is not None and seen.alert_id == alert_id:
            del self._seen[key]

    def _prune(self, now: float) -> None:
        while self._seen:
            key, oldest = next(iter(self._seen.items()))
            if oldest.expires > now:
                break
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)


def settled(value: Any) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
