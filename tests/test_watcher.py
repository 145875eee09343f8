"""The file watcher on its own: which edits it notices, when it reloads, and how it ends.

The daemon's side (a reload that reroutes alerts) is tested end to end in test_reload.py; here a
stand-in daemon records each reload and what routes.yaml held at that moment."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fksroute.watcher import signature, watch_files, watched_files

EVERY = 0.05


class Recorder:
    """What watch_files needs of a daemon: its routes file, its table's files, and reload()."""

    def __init__(self, config_path: Path, files: tuple[str, ...] = ()) -> None:
        self.config_path = config_path
        self.deployment = SimpleNamespace(table=SimpleNamespace(files=files))
        self.reads: list[str | None] = []

    async def reload(self, trigger: str) -> None:
        assert trigger == "watch"
        try:
            self.reads.append(self.config_path.read_text())
        except OSError:
            self.reads.append(None)


async def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not true in time"
        await asyncio.sleep(0.01)


async def watching(daemon: Recorder, body, every: float = EVERY) -> None:
    """Run the watcher while `body()` acts; it must end once told to stop."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(watch_files(daemon, stop, every))
    await asyncio.sleep(every)  # its first look: the files as they are before `body` acts
    try:
        await body()
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)


def test_edits_in_the_same_second_and_of_the_same_size_are_each_reloaded(tmp_path: Path) -> None:
    # watchfiles' polling keeps whole seconds of mtime and misses the second of two such edits.
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\n")
    stamp = routes.stat().st_mtime_ns
    daemon = Recorder(routes)

    async def body() -> None:
        for n, text in enumerate(("version: 2\n", "version: 3\n"), start=1):
            routes.write_text(text)
            os.utime(routes, ns=(stamp, stamp))  # the very same mtime each time: only ctime moves
            await until(lambda: len(daemon.reads) == n)
            assert daemon.reads[-1] == text

    asyncio.run(watching(daemon, body))
    assert daemon.reads == ["version: 2\n", "version: 3\n"]


def test_a_save_in_many_steps_is_read_once_it_holds_still(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("start\n")
    daemon = Recorder(routes)
    final = "".join(f"line {i}\n" for i in range(40))

    def editor() -> None:  # a write every 10 ms for about 0.4 s: never still for a look's length
        with open(routes, "w") as file:
            for i in range(40):
                file.write(f"line {i}\n")
                file.flush()
                time.sleep(0.01)

    async def body() -> None:
        thread = threading.Thread(target=editor)
        thread.start()
        await asyncio.to_thread(thread.join)
        await until(lambda: daemon.reads)
        await asyncio.sleep(4 * EVERY)  # no second reload follows

    asyncio.run(watching(daemon, body, every=0.1))
    assert daemon.reads == [final]


def test_a_change_through_a_hard_link_elsewhere_is_seen(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("a\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "routes.yaml").hardlink_to(routes)
    daemon = Recorder(routes)

    async def body() -> None:
        with open(elsewhere / "routes.yaml", "r+") as file:
            file.write("b\n")
        await until(lambda: daemon.reads)

    asyncio.run(watching(daemon, body))
    assert daemon.reads == ["b\n"]


def test_a_removed_file_reloads_and_so_does_its_return(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("a\n")
    daemon = Recorder(routes)

    async def body() -> None:
        routes.unlink()
        await until(lambda: len(daemon.reads) == 1)  # the daemon keeps its table and says why
        routes.write_text("back\n")
        await until(lambda: len(daemon.reads) == 2)

    asyncio.run(watching(daemon, body))
    assert daemon.reads == [None, "back\n"]


def test_a_file_the_table_names_is_watched_and_an_unnamed_neighbour_is_not(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("a\n")
    schema = tmp_path / "alert.schema.json"
    schema.write_text("{}")
    journal = tmp_path / "journal.sqlite-wal"
    journal.write_bytes(b"")
    daemon = Recorder(routes, files=(str(schema),))

    async def body() -> None:
        for i in range(20):  # the journal beside the table, written all the time
            journal.write_bytes(b"x" * i)
            await asyncio.sleep(0.01)
        await asyncio.sleep(3 * EVERY)
        assert daemon.reads == []
        schema.write_text('{"type": "object"}')
        await until(lambda: daemon.reads)

    asyncio.run(watching(daemon, body))
    assert daemon.reads == ["a\n"]


def test_a_swapped_link_changes_the_signature_and_the_watched_files(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for directory in (one, two):
        directory.mkdir()
        (directory / "routes.yaml").write_text(directory.name)
    (tmp_path / "..data").symlink_to("one")
    routes = tmp_path / "routes.yaml"
    routes.symlink_to("..data/routes.yaml")
    daemon = Recorder(routes)
    before = watched_files(daemon)
    assert {routes, tmp_path / "..data", one / "routes.yaml"} <= before
    looks = signature(before)

    (tmp_path / "..new").symlink_to("two")
    os.replace(tmp_path / "..new", tmp_path / "..data")
    assert signature(before) != looks
    assert two / "routes.yaml" in watched_files(daemon)


def test_a_dangling_link_has_a_signature_and_a_loop_of_links_is_said_once(tmp_path: Path, caplog) -> None:
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere.yaml")
    [(name, own, target)] = signature(frozenset({dangling}))
    assert name == str(dangling) and own is not None and target is None

    loop = tmp_path / "loop.yaml"
    loop.symlink_to("loop.yaml")
    daemon = Recorder(loop)

    async def body() -> None:
        await asyncio.sleep(6 * EVERY)

    with caplog.at_level(logging.WARNING, logger="fksroute.watcher"):
        asyncio.run(watching(daemon, body))
    warnings = [r.getMessage() for r in caplog.records if r.name == "fksroute.watcher"]
    assert len(warnings) == 1 and "cannot look at the routes file" in warnings[0], warnings
    assert daemon.reads == []


@pytest.mark.parametrize("moment", ["idle", "while the file settles"])
def test_the_watcher_ends_when_told(tmp_path: Path, moment: str) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("a\n")
    daemon = Recorder(routes)

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(watch_files(daemon, stop, 0.2))
        await asyncio.sleep(0.05)
        if moment != "idle":
            routes.write_text("b\n")
            await asyncio.sleep(0.25)  # the change is seen; the watcher waits for a second look
        stop.set()
        await asyncio.wait_for(task, 1)

    asyncio.run(run())
    assert daemon.reads == []
