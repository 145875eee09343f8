"""Remember accepted alerts for their dedup window, so a resent alert is not executed again."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(slots=True)
class Seen:
    """The first delivery of an alert. While it is being answered, `reply` resolves to its answer
    (status, body); once answered, only its status is kept, and a resend's answer is rebuilt from
    the journal, so that a busy window does not hold every reply in memory."""

    alert_id: str
    expires: float
    reply: asyncio.Future | None = field(default=None, repr=False)
    status: int = 200

    def answered(self, status: int) -> None:
        self.status, self.reply = status, None


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

    def add(self, key: str, alert_id: str, window: float, reply: asyncio.Future | None, now: float | None = None,
            status: int = 200) -> Seen:
        now = time.time() if now is None else now
        self._prune(now)
        seen = Seen(alert_id, now + window, reply, status)
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
