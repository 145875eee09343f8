"""The journal's fast path writes a group's alerts, orders and results as multi-row statements:
what lands is what single writes would have written, in order, and a bad write still fails alone."""

import asyncio
import random

from fksroute.journal import DONE, OPEN, PENDING, Journal, JournalConflict, read_recent
from fksroute.plugins.base import OrderResult


def test_a_big_group_lands_whole_and_in_order(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()

    async def main():
        writes = []
        for i in range(150):  # more than one statement's worth of rows, in one group
            writes.append(journal.record_alert(f"a{i:03}", source="s", body=f'{{"n": {i}}}', outcome="accepted",
                                               orders=[(f"c{i:03}-{p}", "r", "paper", {"n": i, "p": p}, PENDING,
                                                        None, None) for p in range(i % 3 + 1)]))
        await asyncio.gather(*writes)
        results = []
        for i in range(150):
            # The same order twice in one group: the later result is the one kept.
            results.append(journal.record_result(f"c{i:03}-0", OrderResult("placed", f"v{i}")))
            results.append(journal.record_result(f"c{i:03}-0", OrderResult("filled", f"v{i}", None, 1.0, float(i),
                                                                             {"i": i})))
        await asyncio.gather(*results)
        return [r.client_order_id for r in await journal.unfinished()]

    before = journal.commits
    unfinished = asyncio.run(main())
    assert journal.commits - before <= 4                     # two groups, give or take
    journal.close()
    alerts = {a["id"]: a for a in read_recent(tmp_path / "journal.sqlite", limit=500)}
    assert len(alerts) == 150
    for i in (0, 1, 63, 64, 65, 127, 128, 149):
        orders = alerts[f"a{i:03}"]["orders"]
        assert [o["client_order_id"] for o in orders] == [f"c{i:03}-{p}" for p in range(i % 3 + 1)]
        first = orders[0]
        assert (first["status"], first["state"], first["average_price"], first["detail"]) == \
            ("filled", DONE, float(i), {"i": i})
        assert all(o["state"] == PENDING for o in orders[1:])
        assert alerts[f"a{i:03}"]["body"] == f'{{"n": {i}}}'
    assert len(unfinished) == sum(i % 3 for i in range(150))  # the orders never given a result


def test_a_conflict_inside_a_big_group_fails_alone(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()

    async def main():
        await journal.record_alert("first", source="s", body="{}", outcome="accepted",
                                   orders=[("taken", "r", "paper", {}, PENDING, None, None)])
        writes = [journal.record_alert(f"b{i}", source="s", body="{}", outcome="accepted",
                                       orders=[("taken" if i == 37 else f"d{i}", "r", "paper", {}, PENDING, None,
                                                None)]) for i in range(80)]
        writes.append(journal.record_result("d5", OrderResult("placed", "v")))
        return await asyncio.gather(*writes, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[37], JournalConflict)
    assert all(o is None for i, o in enumerate(outcomes) if i != 37)
    journal.close()
    alerts = {a["id"]: a for a in read_recent(tmp_path / "journal.sqlite", limit=200)}
    assert "b37" not in alerts and len(alerts) == 80
    assert alerts["b5"]["orders"][0]["state"] == OPEN


def test_interleaved_writers_never_wait_forever(tmp_path):
    """Many writers, short pauses, reads among the writes: every write is committed."""
    journal = Journal(tmp_path / "journal.sqlite")
    journal.open()
    rng = random.Random(7)

    async def writer(w):
        for k in range(60):
            coid = f"w{w}-{k}"
            await asyncio.wait_for(journal.record_alert(f"a-{coid}", source="s", body="{}", outcome="accepted",
                                                        orders=[(coid, "r", "p", {}, PENDING, None, None)]), 10)
            if rng.random() < 0.3:
                await asyncio.sleep(rng.random() / 500)
            await asyncio.wait_for(journal.record_result(coid, OrderResult("filled", coid)), 10)
            if rng.random() < 0.1:
                assert (await asyncio.wait_for(journal.order_results(f"a-{coid}"), 10))[0]["status"] == "filled"

    async def main():
        await asyncio.gather(*(writer(w) for w in range(25)))
        return await journal.unfinished()

    assert asyncio.run(main()) == []
    assert journal.writes >= 25 * 60 * 2
    journal.close()
