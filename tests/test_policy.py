"""The per-client policy, identical in both stores: window, minimum, limit, cool-down, clear."""

from __future__ import annotations

import math

import pytest
from test_serve import redis_url  # noqa: F401  (the fixture that starts redis-server)

from advguard.errors import InputError
from advguard.serve import Policy, RedisStore, SQLiteStore

POLICY = Policy(window=10, min_requests=4, flagged_limit=0.5, cooldown_s=60)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return lambda policy=POLICY: SQLiteStore(tmp_path / "clients.db", policy)
    url = request.getfixturevalue("redis_url")
    return lambda policy=POLICY: RedisStore(url, policy)


def test_no_denial_before_the_minimum_number_of_verdicts(store):
    s = store()
    status = s.record("c", [True, True, True], [0.0, 0.0, 0.0], now=0)
    assert status.window == 3 and status.window_flagged == 3 and not status.denied(0)
    status = s.record("c", [True], [0.1], now=1)  # the 4th verdict: 4/4 flagged
    assert status.denied(1) and status.denied_until == 61 and status.denials == 1
    assert "4 of its last 4 inputs were flagged" in status.reason


def test_the_window_slides_and_the_share_decides(store):
    s = store()
    s.record("c", [False] * 10, [0.9] * 10, now=0)
    status = s.record("c", [True] * 4, [0.0] * 4, now=1)  # 4 of the last 10
    assert status.window == 10 and status.window_flagged == 4 and not status.denied(1)
    status = s.record("c", [True], [0.0], now=2)  # 5 of the last 10 reaches 50%
    assert status.denied(2) and status.requests == 15 and status.flagged == 5
    assert status.window_mean_score == pytest.approx((5 * 0.9) / 10)


def test_the_cool_down_ends_the_denial_and_starts_a_new_window(store):
    s = store()
    s.record("c", [True] * 4, [0.0] * 4, now=0)
    assert s.get("c", now=59).denied(59)
    after = s.get("c", now=61)
    assert not after.denied(61) and after.window == 0 and after.denials == 1


def test_until_cleared_and_clear(store):
    s = store(Policy(window=10, min_requests=4, flagged_limit=0.5, cooldown_s=0))
    status = s.record("c", [True] * 4, [0.0] * 4, now=0)
    assert status.denied_until == math.inf and status.denied(10 ** 9)
    assert status.to_json()["denied_until"] == "until cleared"
    cleared = s.clear("c")
    assert not cleared.denied(1) and cleared.window == 0 and cleared.requests == 4
    assert [c.client for c in s.clients()] == ["c"]


def test_clients_are_independent(store):
    s = store()
    s.record("bad", [True] * 4, [0.0] * 4, now=0)
    good = s.record("good", [False] * 4, [1.0] * 4, now=0)
    assert not good.denied(0) and s.get("bad", now=0).denied(0)
    assert s.get("nobody", now=0).requests == 0


@pytest.mark.parametrize("kw, needle", [
    (dict(window=0), "window must be"), (dict(window=5), "cannot exceed the window"),
    (dict(flagged_limit=0), "flagged_limit must be"), (dict(cooldown_s=-1), "cooldown_s must"),
])
def test_impossible_policies_are_refused(kw, needle):
    with pytest.raises(InputError, match=needle):
        Policy(**kw)
