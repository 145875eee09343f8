"""Reloads the table when routes.yaml, or a file it names, changes on disk.

The files are looked at every POLL_EVERY seconds (a stat call for each, and for each symlink on
the way to it), on the event loop. inotify would tell sooner, but it watches directories, and
the journal usually lies beside routes.yaml: every one of the journal's writes, thousands a
second under load, became an event for the watching thread and a cost to the journal's writer,
together about 15 µs of CPU per alert (bench/). watchfiles' own
polling keeps only the whole second of a modification time, and so misses a second edit within
the same second (samuelcolvin/watchfiles#319). A look at a dozen paths costs the same whether
alerts flow or not, and compares what matters exactly: which file a name leads to (device and
inode), its size, and its modification and change times to the nanosecond.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fksroute.daemon import Daemon

log = logging.getLogger("fksroute.watcher")
POLL_EVERY = 0.1  # seconds between looks; a change is reloaded once two looks in a row agree
_MAX_LINKS = 40

Signature = tuple[tuple[str, tuple[int, ...] | None, tuple[int, ...] | None], ...]


def _symlinks(path: Path) -> set[Path]:
    """Every symlink met while resolving `path`: replacing any of them changes what `path` reads."""
    links: set[Path] = set()
    current, parts, hops = Path(path.anchor), list(path.parts[1:]), 0
    while parts and hops < _MAX_LINKS:  # a loop of links ends here, as it would for the kernel
        candidate = current / parts.pop(0)
        if candidate.name == "..":
            current = current.parent
        elif candidate.is_symlink():
            links.add(candidate)
            hops += 1
            target = Path(os.readlink(candidate))
            if target.is_absolute():
                current = Path(target.anchor)
            parts[:0] = target.parts[1:] if target.is_absolute() else target.parts
        else:
            current = candidate
    return links


def watched_files(daemon: Daemon) -> frozenset[Path]:
    """routes.yaml and every file its table references, as named and as resolved, with every symlink
    on the way: saving one, renaming a new file onto it, or swapping a link (`..data`) changes the table."""
    table = daemon.deployment.table if daemon.deployment else None
    paths: set[Path] = set()
    for name in (daemon.config_path, *(table.files if table else ())):
        absolute = Path(os.path.abspath(name))
        paths |= {absolute, absolute.resolve(), *_symlinks(absolute)}
    return frozenset(paths)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def signature(paths: frozenset[Path]) -> Signature:
    """What each path is now: the link itself and what it leads to (None where nothing is)."""
    looks = []
    for path in sorted(paths):
        try:
            own = os.lstat(path)
        except OSError:
            looks.append((str(path), None, None))
            continue
        target: tuple[int, ...] | None = _identity(own)
        if stat.S_ISLNK(own.st_mode):
            try:
                target = _identity(os.stat(path))
            except OSError:  # a dangling link
                target = None
        looks.append((str(path), _identity(own), target))
    return tuple(looks)


async def watch_files(daemon: Daemon, stop: asyncio.Event, every: float = POLL_EVERY) -> None:
    """Reload whenever a watched file changes, until `stop` is set."""
    files: frozenset[Path] | None = None
    seen: Signature = ()
    problem = None
    while True:
        try:
            if files is None:
                files = watched_files(daemon)
                seen = signature(files)
            elif (look := signature(files)) != seen:
                now = await _held_still(files, look, stop, every)
                if now is None:
                    return
                await daemon.reload("watch")
                moved = watched_files(daemon)  # a link swap or a new table moves the files
                files, seen = (files, now) if moved == files else (moved, signature(moved))
            problem = None
        except Exception as exc:  # a loop of links, no permission...: looked at again next time
            if str(exc) != problem:
                log.warning("cannot look at the routes file (%s: %s)", type(exc).__name__, exc)
                problem = str(exc)
            files = None
        if await _stopped(stop, every):
            return


async def _held_still(files: frozenset[Path], now: Signature, stop: asyncio.Event,
                      every: float) -> Signature | None:
    """The files' signature once two looks `every` apart agree, the first being `now`: an editor
    may save in steps (truncate, then write), and the table is read once they are done. None if
    stopped meanwhile."""
    while not await _stopped(stop, every):
        again = signature(files)
        if again == now:
            return now
        now = again
    return None


async def _stopped(stop: asyncio.Event, wait: float) -> bool:
    """Wait `wait` seconds; True if `stop` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), wait)
    except asyncio.TimeoutError:
        return False
    return True
