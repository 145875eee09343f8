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


def test_an_entry_being_answered_is_shared_then_kept_compact_with_its_status():
    cache = DedupCache()
    seen = cache.add("k", "a1", 60, answering=True, now=1000.0)
    assert cache.get("k", now=1001.0) is seen and seen.answering  # a resend waits on this one
    seen.answered(202, {"alert_id": "a1"})
    later = cache.get("k", now=1002.0)
    assert later is not seen and not later.answering
    assert (later.alert_id, later.status, later.expires) == ("a1", 202, 1060.0)
    assert len(cache) == 1


def test_an_alert_forgotten_while_being_answered_is_not_kept_once_answered():
    cache = DedupCache()
    seen = cache.add("k", "a1", 60, answering=True, now=1000.0)
    cache.forget("k", "a1")  # the journal failed: the alert was never accepted
    seen.answered(503, {"error": "journal"})
    assert cache.get("k", now=1001.0) is None and len(cache) == 0


def test_an_answer_after_the_window_does_not_hide_the_next_delivery():
    cache = DedupCache()
    slow = cache.add("k", "a1", 10, answering=True, now=1000.0)
    assert cache.get("k", now=1011.0) is None  # its window passed while it was being answered
    fresh = cache.add("k", "a2", 10, answering=True, now=1011.0)
    slow.answered(200)
    assert cache.get("k", now=1012.0) is fresh
    fresh.answered(200)
    assert cache.get("k", now=1012.0).alert_id == "a2" and len(cache) == 1


def test_keys_and_ids_of_any_text_are_told_apart_and_given_back():
    cache = DedupCache()
    keys = ["é", "e\u0301", "\ud800", "", "a" * 10_000, "{\"id\": 1}"]
    for i, key in enumerate(keys):
        cache.add(key, f"id-{i}-\u00e9\ud800", 60, now=1000.0)
    for i, key in enumerate(keys):
        assert cache.get(key, now=1000.0).alert_id == f"id-{i}-\u00e9\ud800"
    assert len(cache) == len(keys)


def test_a_full_window_costs_under_250_bytes_an_alert():
    import hashlib
    import tracemalloc

    from fksroute.journal import new_alert_id

    cache = DedupCache()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(50_000):  # the daemon's keys and ids: a SHA-256 in hex, 24 hex characters
            cache.add(hashlib.sha256(b"%d" % i).hexdigest(), new_alert_id(), 60, answering=True,
                      now=1000.0).answered(200)
        per_alert = (tracemalloc.get_traced_memory()[0] - before) / 50_000
    finally:
        tracemalloc.stop()
    assert len(cache) == 50_000
    assert per_alert < 250, per_alert  # about 190; 370 when each entry was an object with its key's text
