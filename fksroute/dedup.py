"""Remember accepted alerts for their dedup window, so a resent alert is not executed again."""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# An answered entry is one bytes value: the key's digest, when it expires, the answer's status and
# the alert's id. A busy window holds a few hundred thousand of them: as objects (the entry, its
# float, the key's text and the id's) they took twice the memory, and the cyclic collector walked them.
_DIGEST = 16  # bytes of BLAKE2b: a window of 2**32 alerts holds two keys that collide with odds 2**-65
_HEAD = struct.Struct("<dH")  # expires, status
_ID_AT = _DIGEST + _HEAD.size


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=_DIGEST).digest()


def _text(packed: bytes) -> str:
    return packed[_ID_AT:].decode("utf-8", "surrogatepass")


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
    digest: bytes | None = field(default=None, repr=False)  # of its key, while answering
    cache: "DedupCache | None" = field(default=None, repr=False)  # where it goes once answered

    def wait_reply(self) -> asyncio.Future:
        """While answering: resolves to the first delivery's (status, body)."""
        if self.reply is None:
            self.reply = asyncio.get_running_loop().create_future()
        return self.reply

    def answered(self, status: int, body: Any = None) -> None:
        """The first delivery's answer, for the resends waiting on it; the entry is kept compact from now."""
        if self.reply is not None and not self.reply.done():
            self.reply.set_result((status, body))
        self.status, self.reply, self.answering = status, None, False
        cache, self.cache = self.cache, None
        if cache is not None and self.digest is not None:
            cache._settled(self.digest, self)


class DedupCache:
    """Entries being answered as `Seen` objects (a few: those in flight); answered ones packed."""

    def __init__(self) -> None:
        # Both by the digest of the key: a new alert's `get` makes it, and its `add` (which
        # follows with nothing awaited between) takes it from `_last`.
        self._answering: dict[bytes, Seen] = {}
        self._answered: dict[bytes, bytes] = {}
        self._last: tuple[str, bytes] = ("", _digest(""))
        self._order: deque[bytes] = deque()  # packed entries, the first added first
        self._prune_at = math.inf  # no entry expires before this: nothing to prune until then

    def get(self, key: str, now: float | None = None) -> Seen | None:
        now = time.time() if now is None else now
        digest = self._digest(key)
        seen = self._answering.get(digest)
        if seen is not None:
            if seen.expires > now:
                return seen
            del self._answering[digest]  # answered too late for its window: the next delivery is new
            seen.cache = None
        packed = self._answered.get(digest)
        if packed is None:
            return None
        expires, status = _HEAD.unpack_from(packed, _DIGEST)
        if expires <= now:
            del self._answered[digest]
            return None
        return Seen(_text(packed), expires, False, status)

    def add(self, key: str, alert_id: str, window: float, answering: bool = False, now: float | None = None,
            status: int = 200) -> Seen:
        now = time.time() if now is None else now
        if now >= self._prune_at:
            self._prune(now)
        seen = Seen(alert_id, now + window, answering, status)
        digest = self._digest(key)
        if answering:
            seen.digest, seen.cache = digest, self
            self._answering[digest] = seen
        else:
            self._store(digest, seen)
        return seen

    def forget(self, key: str, alert_id: str) -> None:
        """Drop an entry whose alert was not accepted after all (the journal failed)."""
        digest = self._digest(key)
        seen = self._answering.get(digest)
        if seen is not None and seen.alert_id == alert_id:
            del self._answering[digest]
            seen.cache = None
            return
        packed = self._answered.get(digest)
        if packed is not None and _text(packed) == alert_id:
            del self._answered[digest]

    def _digest(self, key: str) -> bytes:
        last = self._last
        if last[0] == key:
            return last[1]
        digest = _digest(key)
        self._last = (key, digest)
        return digest

    def _settled(self, digest: bytes, seen: Seen) -> None:
        if self._answering.get(digest) is seen:
            del self._answering[digest]
            self._store(digest, seen)

    def _store(self, digest: bytes, seen: Seen) -> None:
        packed = digest + _HEAD.pack(seen.expires, seen.status) + seen.alert_id.encode("utf-8", "surrogatepass")
        self._answered[digest] = packed
        self._order.append(packed)
        if seen.expires < self._prune_at:
            self._prune_at = seen.expires

    def _prune(self, now: float) -> None:
        """Drop the expired entries at the front (a later entry with a shorter window waits for
        the ones before it: `get` still treats it as expired)."""
        order, answered = self._order, self._answered
        while order:
            packed = order[0]
            expires = _HEAD.unpack_from(packed, _DIGEST)[0]
            if expires > now:
                self._prune_at = expires
                return
            order.popleft()
            digest = packed[:_DIGEST]
            if answered.get(digest) is packed:  # not replaced by a later entry for the same key
                del answered[digest]
        self._prune_at = math.inf

    def __len__(self) -> int:
        return len(self._answering) + len(self._answered)
