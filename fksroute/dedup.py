"""Remember accepted alerts for their dedup window, so a resent alert is not executed again."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Seen:
    """The first delivery of an alert. While it is being answered, a resend waits for its answer
    (status, body); once answered, only its status is kept, and a resend's answer is rebuilt from
    the journal, so that a busy window does not hold every reply in memory."""

    alert_id: str
    expires: float
    answering: bool = False
    status: int = 200
    reply: asyncio.Future | None = field(default=None, repr=False)  # made only when a resend waits

    def wait_reply(self) -> asyncio.Future:
        """While answering: resolves to the first delivery's (status, body)."""
        if self.reply is None:
            self.reply = asyncio.get_running_loop().create_future()
        return self.reply

    def answered(self, status: int, body: Any = None) -> None:
        """The first delivery's answer, for the resends waiting on it."""
        if self.reply is not None and not self.reply.done():
            self.reply.set_result((status, body))
        self.status, self.reply, self.answering = status, None, False


class DedupCache:
    def __init__(self) -> None:
        self._seen: OrderedDict[str, Seen] = OrderedDict()  # the first added first
        self._prune_at = math.inf  # no entry expires before this: nothing to prune until then

    def get(self, key: str, now: float | None = None) -> Seen | None:
        seen = self._seen.get(key)
        if seen is not None and seen.expires <= (time.time() if now is None else now):
            del self._seen[key]
            return None
        return seen

    def add(self, key: str, alert_id: str, window: float, answering: bool = False, now: float | None = None,
            status: int = 200) -> Seen:
        now = time.time() if now is None else now
        if now >= self._prune_at:
            self._prune(now)
        seen = Seen(alert_id, now + window, answering, status)
        if seen.expires < self._prune_at:
            self._prune_at = seen.expires
        entries = self._seen
        if key in entries:
            entries.move_to_end(key)
        entries[key] = seen
        return seen

    def forget(self, key: str, alert_id: str) -> None:
        """Drop an entry whose alert was not accepted after all (the journal failed)."""
        seen = self._seen.get(key)
        if seen is not None and seen.alert_id == alert_id:
            del self._seen[key]

    def _prune(self, now: float) -> None:
        """Drop the expired entries at the front (a later entry with a shorter window waits for
        the ones before it: `get` still treats it as expired)."""
        entries = self._seen
        while entries:
            oldest = next(iter(entries.values()))
            if oldest.expires > now:
                self._prune_at = oldest.expires
                return
            entries.popitem(last=False)
        self._prune_at = math.inf

    def __len__(self) -> int:
        return len(self._seen)
