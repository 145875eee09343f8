"""The dedup cache: an alert is known for its window, then forgotten, and memory stays bounded."""

from fksroute.dedup import DedupCache


def test_an_entry_is_known_within_its_window_and_not_after():
    cache = DedupCache()
    cache.add("k", "a1", 60, now=1000.0)
    assert cache.get("k", now=1059.9).alert_id == "a1"
    assert cache.get("k", now=1060.0) is None
    assert len(cache) == 0  # the expired entry is gone, not only hidden


def test_expired_entries_are_dropped_as_new_ones_arrive():
    cache = DedupCache()
    for i in range(1000):
        cache.add(f"k{i}", f"a{i}", 10, now=1000.0 + i * 0.1)
    assert len(cache) == 100  # one window's worth: 10 s at 10 per second
    assert cache.get("k899", now=1099.95) is None and cache.get("k999", now=1099.95).alert_id == "a999"


def test_a_shorter_window_behind_a_longer_one_still_expires_on_time():
    cache = DedupCache()
    cache.add("long", "a1", 60, now=1000.0)
    cache.add("short", "a2", 5, now=1001.0)
    assert cache.get("short", now=1005.9).alert_id == "a2"
    assert cache.get("short", now=1006.0) is None
    assert cache.get("long", now=1006.0).alert_id == "a1"
    cache.add("later", "a3", 5, now=1061.0)  # the long one expired meanwhile: pruned now
    assert len(cache) == 1


def test_adding_a_key_again_replaces_it_and_makes_it_the_newest():
    cache = DedupCache()
    cache.add("k", "a1", 10, now=1000.0)
    cache.add("j", "a2", 10, now=1001.0)
    cache.add("k", "a3", 10, now=1002.0)
    assert cache.get("k", now=1011.5).alert_id == "a3"  # its new window, not the first one's
    cache.add("x", "a4", 10, now=1011.5)  # prunes j (expired at 1011), keeps k
    assert len(cache) == 2 and cache.get("j", now=1011.5) is None


def test_forget_drops_only_that_alerts_entry():
    cache = DedupCache()
    cache.add("k", "a1", 10, now=1000.0)
    cache.forget("k", "other")
    assert cache.get("k", now=1000.0).alert_id == "a1"
    cache.forget("k", "a1")
    assert cache.get("k", now=1000.0) is None
