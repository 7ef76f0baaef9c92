"""The most-limited-clients tracker: exact while it has room, bounded and still right about heavy hitters."""

from __future__ import annotations

import random

import pytest

from rateguard import ConfigurationError
from rateguard.topk import LIMITED, LimitedClients

from .conftest import FakeClock


def test_counts_exactly_while_there_is_room(clock: FakeClock) -> None:
    top = LimitedClients(capacity=8, clock=clock)
    for client, n in (("203.0.113.7", 5), ("id:team-42", 3), ("198.51.100.1", 1)):
        for _ in range(n):
            top.add(client, "global")
    clock.advance(2.5)
    assert [(e.client, e.count, e.error) for e in top.top()] == [
        ("203.0.113.7", 5, 0),
        ("id:team-42", 3, 0),
        ("198.51.100.1", 1, 0),
    ]
    first = top.top(1)[0]
    assert first.bucket == "global"
    assert first.seconds_ago == pytest.approx(2.5)


def test_remembers_the_last_bucket_that_denied_a_client(clock: FakeClock) -> None:
    top = LimitedClients(clock=clock)
    top.add("a", "global")
    top.add("a", "GET /api/expensive")
    assert top.top()[0].bucket == "GET /api/expensive"


def test_memory_is_bounded_and_heavy_hitters_survive_a_flood_of_one_off_clients(clock: FakeClock) -> None:
    top = LimitedClients(capacity=32, window=300, slots=5, clock=clock)
    rng = random.Random(7)
    heavy = {f"10.0.0.{i}": 400 - 50 * i for i in range(4)}  # 400, 350, 300, 250 denials
    events = [c for c, n in heavy.items() for _ in range(n)]
    events += [f"id:scanner-{i}" for i in range(3000)]  # each denied once
    # Per slot of 60 s: ~3000 denials, so any client above 3000 / 32 of them is certain to be held.
    rng.shuffle(events)
    for i, client in enumerate(events):
        top.add(client, "global")
        if i % 500 == 0:
            clock.advance(10)  # spread over several slots
        assert len(top) <= 32 * 5
    ranked = top.top(4)
    assert [e.client for e in ranked] == list(heavy)
    for e in ranked:
        # Space-Saving only overcounts, and by at most its error.
        assert e.count - e.error <= heavy[e.client] <= e.count


@pytest.mark.parametrize("seed", range(5))
def test_space_saving_bounds_hold_on_skewed_streams(clock: FakeClock, seed: int) -> None:
    top = LimitedClients(capacity=10, window=60, slots=1, clock=clock)  # one slot: one summary
    rng = random.Random(seed)
    true: dict[str, int] = {}
    for _ in range(5000):
        client = f"c{int(rng.paretovariate(1.2))}"  # a few heavy clients, a long tail
        true[client] = true.get(client, 0) + 1
        top.add(client, "global")
    held = top.top(10)
    assert len(held) == len(top) == 10
    assert sum(e.count for e in held) == 5000  # Space-Saving's counters always add up to N
    for e in held:
        assert e.count - e.error <= true[e.client] <= e.count
    # Every client above N / capacity is held.
    assert {c for c, n in true.items() if n > 5000 / 10} <= {e.client for e in held}


def test_old_denials_leave_the_window(clock: FakeClock) -> None:
    top = LimitedClients(window=300, slots=5, clock=clock)
    top.add("old", "global")
    clock.advance(120)
    top.add("recent", "global")
    assert {e.client for e in top.top()} == {"old", "recent"}
    clock.advance(240)  # "old" was denied 360 s ago, "recent" 240 s ago
    assert [e.client for e in top.top()] == ["recent"]
    clock.advance(120)
    assert top.top() == []
    top.add("new", "global")
    assert len(top) == 1  # expired slots are dropped as new ones start


def test_counts_of_one_client_add_up_across_slots(clock: FakeClock) -> None:
    top = LimitedClients(window=300, slots=5, clock=clock)
    for _ in range(4):
        top.add("a", "global")
        clock.advance(60)
    assert top.top()[0].count == 4


def test_ties_are_ordered_by_client(clock: FakeClock) -> None:
    top = LimitedClients(clock=clock)
    for client in ("b", "c", "a"):
        top.add(client, "global")
    assert [e.client for e in top.top(2)] == ["a", "b"]


def test_clear() -> None:
    top = LimitedClients()
    top.add("a", "global")
    top.clear()
    assert top.top() == [] and len(top) == 0


@pytest.mark.parametrize(
    "options",
    [{"capacity": 0}, {"capacity": True}, {"slots": 0}, {"window": 0}, {"window": "5m"}],
)
def test_bad_options_are_configuration_errors(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        LimitedClients(**options)  # type: ignore[arg-type]


def test_the_process_wide_tracker_exists() -> None:
    assert isinstance(LIMITED, LimitedClients)
    assert "capacity=64" in repr(LIMITED)
