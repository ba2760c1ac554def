"""The per-client policy, identical in both stores: window, minimum, limit, cool-down, clear."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
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
    (dict(flagged_limit=1.5), "flagged_limit must be"), (dict(cooldown_s=-1), "cooldown_s must"),
])
def test_impossible_policies_are_refused(kw, needle):
    with pytest.raises(InputError, match=needle):
        Policy(**kw)


# --- absolute evidence: dilution, attack processes, races ------------------------------------

BUDGET = Policy(window=50, min_requests=20, flagged_limit=0.5, max_flagged=5, max_repeats=3,
                window_s=100, cooldown_s=0)


def test_diluting_with_clean_images_does_not_slip_past_the_flagged_budget(store):
    """One flagged image among ten clean ones, again and again: the share stays at 9%, the
    absolute count reaches the budget, and the request that reaches it is not answered."""
    s = store(BUDGET)
    answered_flagged = 0
    for i in range(10):
        a = s.admit("diluter", [False] * 10 + [True], [0.9] * 10 + [0.0], now=i)
        if not a.answered:
            break
        answered_flagged += 1
    assert not a.answered and a.denied_now and i == 4  # the 5th flagged image denies
    assert answered_flagged == BUDGET.max_flagged - 1
    assert a.status.recent_flagged == 5 and "5 of its inputs within 100 s" in a.status.reason
    assert not s.admit("diluter", [False], [0.9], now=10).answered  # refused from then on


def test_flagged_images_older_than_the_window_no_longer_count(store):
    s = store(BUDGET)
    for t in (0, 10, 20, 30):
        assert s.admit("slow", [True] + [False] * 20, [0.0] + [0.9] * 20, now=t).answered
    assert s.get("slow", now=30).recent_flagged == 4
    late = s.admit("slow", [True] + [False] * 20, [0.0] + [0.9] * 20, now=105)
    assert late.answered and late.status.recent_flagged == 4  # the one at t = 0 has expired


def watch(threshold: float = 0.2, k: int = 3, history: int = 8, ttl: float = 50.0):
    from advguard.serve.queries import QueryWatch

    return QueryWatch(query_k=k, query_history=history, query_ttl_s=ttl, threshold=threshold)


def codes(n: int, seed: int, spread: float = 1.0) -> np.ndarray:
    """Unit-length codes: far apart (spread 1) or near-copies of one (spread ≪ 1)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, 16))
    z = base + spread * rng.normal(size=(n, 16))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)


@pytest.fixture(params=["sqlite", "redis"])
def watched(request, tmp_path):
    if request.param == "sqlite":
        return lambda policy=BUDGET, w=None: SQLiteStore(tmp_path / "w.db", policy, w or watch())
    url = request.getfixturevalue("redis_url")
    return lambda policy=BUDGET, w=None: RedisStore(url, policy, w or watch())


def test_near_copies_are_an_attack_process_and_distinct_queries_are_not(watched):
    s = watched()
    distinct = codes(40, seed=1, spread=10.0)
    for i, c in enumerate(distinct):
        a = s.admit("honest", [False], [0.9], c[None], now=i)
        assert a.answered and not a.repeats.any()
    near = codes(40, seed=2, spread=0.01)
    outcomes = [s.admit("prober", [False], [0.9], c[None], now=i) for i, c in enumerate(near)]
    answered = [a.answered for a in outcomes]
    # the first k are not tested; then every near-copy is a detection; the 3rd denies
    assert answered.index(False) == 3 + 2 and not any(answered[6:])
    assert [bool(a.repeats[0]) for a in outcomes[:6]] == [False, False, False, True, True, True]
    assert "near-copies" in outcomes[5].status.reason
    assert s.get("honest", now=50).queries == 8  # the history is bounded


def test_a_batch_of_near_copies_in_one_request_detects_itself(watched):
    s = watched()
    a = s.admit("batcher", [False] * 10, [0.9] * 10, codes(10, seed=3, spread=0.01), now=0)
    assert not a.answered and a.repeats.sum() == 7  # queries 4 … 10 each see 3 earlier ones


def test_the_query_history_expires(watched):
    s = watched()
    near = codes(6, seed=4, spread=0.01)
    for i in range(3):
        s.admit("c", [False], [0.9], near[i][None], now=i)
    later = s.admit("c", [False], [0.9], near[3][None], now=200)  # the first three expired
    assert later.answered and not later.repeats.any() and later.status.queries == 1


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_parallel_requests_cannot_outrun_a_denial(kind, tmp_path, request):
    """Sixteen threads send 8-image requests, all flagged, at once: the flagged images
    answered stay below the budget (before, each request was checked before any was
    counted)."""
    from concurrent.futures import ThreadPoolExecutor

    policy = Policy(window=50, min_requests=20, flagged_limit=0, max_flagged=20,
                    max_repeats=0, cooldown_s=0)
    if kind == "sqlite":
        stores = [SQLiteStore(tmp_path / "race.db", policy) for _ in range(4)]
    else:
        url = request.getfixturevalue("redis_url")
        stores = [RedisStore(url, policy) for _ in range(4)]

    def one(i: int) -> bool:
        return stores[i % 4].admit("racer", [True] * 8, [0.0] * 8).answered

    with ThreadPoolExecutor(16) as pool:
        answered = sum(pool.map(one, range(32)))
    assert 8 * answered < policy.max_flagged  # 2 requests (16 images), never more
    assert answered == 2


def replicas(kind: str, request, tmp_path, policy: Policy, w) -> tuple[Any, Any]:
    """Two stores sharing one state: two SQLite workers on one file, or two Redis replicas."""
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "w.db", policy, w), SQLiteStore(tmp_path / "w.db", policy, w)
    url = request.getfixturevalue("redis_url")
    return RedisStore(url, policy, w), RedisStore(url, policy, w)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_workers_sharing_one_state_see_one_query_history(kind, request, tmp_path):
    """Each worker process (SQLite) or replica (Redis) keeps its clients' histories read and
    fetches only what was added since its copy; what another adds or trims is seen all the
    same."""
    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)  # nothing denies
    a, b = replicas(kind, request, tmp_path, quiet, watch(history=8))
    near = codes(40, seed=5, spread=0.01)
    far = codes(40, seed=6, spread=10.0)

    def send(store, code, now):
        return bool(store.admit("p", [False], [0.9], code[None], now=now).repeats[0])

    # near-copies sent by turns through both: each sees the other's (3 untested, then found)
    assert [send((a, b)[i % 2], near[i], i) for i in range(6)] == [False] * 3 + [True] * 3
    for i in range(8):  # a alone: 8 distinct queries push every near-copy out (history 8)
        send(a, far[i], 10 + i)
    assert not send(b, near[6], 20)  # b's copy held near-copies: it saw a's trim
    for i in range(4):
        send(a, near[7 + i], 21 + i)
    assert send(b, near[11], 30)  # and a's newest near-copies


def test_a_redis_replica_notices_a_clear_behind_its_copy(request, tmp_path):
    """A clear followed by as many new queries as the replica's copy held (the push count back
    where the copy left it): the copy's newest entry is no longer where it should be, and the
    history is read whole — the cleared queries are not compared with."""
    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)
    a, b = replicas("redis", request, tmp_path, quiet, watch(history=8))
    near, far = codes(10, seed=5, spread=0.01), codes(10, seed=6, spread=10.0)
    for i in range(3):
        b.admit("q", [False], [0.9], far[i][None], now=i)
    a.clear("q")
    for i in range(3):
        a.admit("q", [False], [0.9], near[i][None], now=10 + i)
    assert b.admit("q", [False], [0.9], near[3][None], now=20).repeats[0]
    for i in range(3):  # and b's copy, read whole, goes on being brought up to date
        a.admit("q", [False], [0.9], far[3 + i][None], now=21 + i)
    assert not b.admit("q", [False], [0.9], far[6][None], now=30).repeats[0]
    assert b.admit("q", [False], [0.9], near[4][None], now=31).repeats[0]


def test_a_sqlite_worker_notices_rows_reused_or_deleted_behind_its_copy(tmp_path):
    """A clear followed by new queries whose rows take the old ids again (the table emptied),
    and rows deleted by hand from the middle of a history: either makes the copy stale."""
    import sqlite3

    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)
    a, b = (SQLiteStore(tmp_path / "r.db", quiet, watch(history=8)) for _ in range(2))
    near, far = codes(10, seed=5, spread=0.01), codes(10, seed=6, spread=10.0)
    for i in range(3):  # b's copy: rows 1, 2, 3, far apart
        b.admit("q", [False], [0.9], far[i][None], now=i)
    a.clear("q")
    for i in range(3):  # rows 1, 2, 3 again, near-copies
        a.admit("q", [False], [0.9], near[i][None], now=10 + i)
    assert b.admit("q", [False], [0.9], near[3][None], now=20).repeats[0]  # rows 1 … 4

    with sqlite3.connect(tmp_path / "r.db") as db:
        db.execute("DELETE FROM queries WHERE id IN (2, 3)")
    a.admit("q", [False], [0.9], far[4][None], now=21)
    # rows 1 and 4 (near-copies) beside row 5 (far): the three nearest include the far one
    assert not b.admit("q", [False], [0.9], near[4][None], now=22).repeats[0]


def test_codes_of_an_earlier_encoding_are_dropped_from_a_sqlite_history(tmp_path):
    import sqlite3

    s = SQLiteStore(tmp_path / "w.db", Policy(max_repeats=0), watch())
    s.admit("c", [False], [0.9], codes(1, seed=7)[:1], now=0)
    with sqlite3.connect(tmp_path / "w.db") as db:  # an 8×8 code left by an earlier version
        db.execute("INSERT INTO queries (client, t, code, answer) VALUES ('c', 1, ?, '{}')",
                   (bytes(128),))
    fresh = SQLiteStore(tmp_path / "w.db", Policy(max_repeats=0), watch())
    assert fresh.admit("c", [False], [0.9], codes(1, seed=8)[:1], now=2).status.queries == 2


# --- the global index: an attack spread over several keys ------------------------------------

def linking(threshold: float = 0.2, k: int = 3, history: int = 8, size: int = 50):
    from advguard.serve.queries import QueryWatch

    return QueryWatch(query_k=k, query_history=history, query_ttl_s=50.0, query_global=size,
                      threshold=threshold, global_threshold=threshold)


def _round_robin(s, keys: list[str], near: np.ndarray) -> list[bool]:
    """Near-copies of one image sent by turns from ``keys``, until every key is denied;
    whether each was answered."""
    answered = []
    for i, c in enumerate(near):
        key = keys[i % len(keys)]
        answered.append(s.admit(key, [False], [0.9], c[None], now=i).answered)
        if all(s.get(k, now=i).denied(i) for k in keys):
            break
    return answered


def test_an_attack_spread_over_keys_is_linked_and_every_key_is_denied(watched):
    """Three keys take turns sending near-copies of one image: alone, each key's history holds
    a third of the stream; the global index links every query to the other keys' and every
    key is denied, after far fewer answers than the same stream gets without the index."""
    near = codes(120, seed=9, spread=0.01)
    spread = _round_robin(watched(w=linking()), ["k1", "k2", "k3"], near)
    s = watched(w=linking(size=0))  # the same stream, each key on its own
    alone = _round_robin(s, ["a1", "a2", "a3"], near)
    assert sum(spread) <= 9 and sum(alone) >= 3 * (3 + 2)  # k untested, then 3 detections each
    assert sum(spread) < sum(alone)


def test_moved_queries_spread_over_keys_are_aligned_with_the_global_index(watched):
    """A colour image searched with every query cropped (blinding by moves) and the
    queries sent by turns from three keys: the global index aligns each query with the other
    keys' newest ones as a client's history does, so the keys are linked once view_k of the
    other keys' queries are in — the eighth query — where, compared unmoved, the same stream
    goes on unlinked."""
    from pathlib import Path

    import torch
    import torch.nn.functional as F

    from advguard.data import load_dataset
    from advguard.serve.queries import QueryWatch, calibrate, encode

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    x = load_dataset("cifar10", "test", limit=30, data_dir=shared).x
    gen = torch.Generator().manual_seed(12)
    sent = []
    for _ in range(18):
        noise = 8 / 255 * torch.sign(torch.randn(x[:1].shape, generator=gen))
        q = (x[:1] + noise).clamp(0, 1)
        top, left = (int(v) for v in torch.randint(0, 3, (2,), generator=gen))
        sent.append(F.interpolate(q[..., top:30 + top, left:30 + left], size=(32, 32),
                                  mode="bilinear", align_corners=False))
    stream = torch.cat(sent)
    codes_ = encode(stream)
    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0, max_flips=0)

    def first_linked(w: QueryWatch, tag: str, start: float) -> int | None:
        s = watched(quiet, w)
        windows = w.windows(stream)
        for i in range(len(stream)):
            got = s.admit(f"{tag}{i % 3}", [False], [0.9], codes_[i:i + 1], now=start + i,
                          answers=[_answer(3)],
                          moved=None if windows is None else windows[i:i + 1])
            if got.status.linked:
                return i
        return None

    held = encode(x[1:30])
    settings = dict(query_eps=8 / 255, query_history=100, query_global=100, query_ttl_s=100.0)
    aligned = calibrate(held, QueryWatch(**settings))
    unaligned = calibrate(held, QueryWatch(**settings, query_shift=0, query_crop=0))
    # the other keys' view_k = 5 queries: k1's third (k0 and k2 sent 0, 2, 3, 5, 6)
    assert first_linked(aligned, "a", 0) == 7
    assert first_linked(unaligned, "u", 1000) is None  # the first run's queries expired


def test_linked_keys_are_named_and_denied_at_their_next_request(watched):
    """k2's detections link it to k1; they count on k1 once k1 has one of its own, and k1's
    then count on k2: the request that denies k1 denies k2 with it (k2's next is refused)."""
    s = watched(w=linking())
    near = codes(40, seed=10, spread=0.01)
    for i in range(6):  # k1 and k2 by turns: k2's last query is a detection linked to k1
        s.admit(("k1", "k2")[i % 2], [False], [0.9], near[i][None], now=i)
    k1 = s.get("k1", now=5)
    assert k1.linked == ["k2"] and k1.recent_repeats == 0  # none of its own yet
    assert s.admit("k1", [False], [0.9], near[6][None], now=6).status.recent_repeats == 2
    last = s.admit("k1", [False], [0.9], near[7][None], now=7)
    assert not last.answered and last.denied_now
    k2 = s.get("k2", now=8)
    assert k2.denied(8) and k2.reason.startswith("linked to client 'k1'")
    assert not s.admit("k2", [False], [0.9], codes(1, seed=16, spread=10.0), now=8).answered


def test_near_copies_of_an_honest_clients_image_do_not_get_it_denied(watched):
    """An attacker who near-copies images an honest client sent links to that client, but a
    client with no detection of its own is never denied for what another key did."""
    s = watched(w=linking())
    near = codes(30, seed=11, spread=0.01)
    for i in range(3):  # three frames of one scene: too few to be tested (k = 3)
        assert s.admit("honest", [False], [0.9], near[i][None], now=i).answered
    answered = [s.admit("copier", [False], [0.9], c[None], now=3 + i).answered
                for i, c in enumerate(near[3:])]
    assert not all(answered)  # the copier is denied
    honest = s.get("honest", now=40)
    assert honest.linked == ["copier"] and not honest.denied(40)
    assert s.admit("honest", [False], [0.9], codes(1, seed=12, spread=10.0), now=41).answered


def test_a_clear_takes_the_clients_queries_out_of_the_global_index(watched):
    s = watched(w=linking())
    near = codes(10, seed=13, spread=0.01)
    for i in range(4):
        s.admit("first", [False], [0.9], near[i][None], now=i)
    s.clear("first")
    a = s.admit("second", [False], [0.9], near[4][None], now=5)
    assert not a.repeats.any()  # nothing of first's left to near-copy
    assert s.admit("second", [False], [0.9], near[5][None], now=6).status.linked == []


def test_two_sqlite_workers_share_one_global_index(tmp_path):
    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)
    a, b = (SQLiteStore(tmp_path / "g.db", quiet, linking()) for _ in range(2))
    near = codes(10, seed=14, spread=0.01)
    for i in range(3):
        a.admit(f"a{i}", [False], [0.9], near[i][None], now=i)  # three keys through worker a
    found = b.admit("b", [False], [0.9], near[3][None], now=3)
    assert found.repeats[0] and found.status.linked == ["a0", "a1", "a2"]


def test_the_state_file_and_its_wal_are_readable_by_the_service_user_alone(tmp_path):
    """The stored query codes tell what images each client sent: 0600, also for a file an
    earlier version left world-readable."""
    import os
    import stat

    path = tmp_path / "clients.db"
    s = SQLiteStore(path, POLICY, watch())
    s.admit("c", [False], [0.9], codes(1, seed=15), now=0)
    parts = [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")]
    assert all(p.exists() for p in parts)
    assert {stat.S_IMODE(p.stat().st_mode) for p in parts} == {0o600}
    for p in parts:  # as an earlier version left them, while a worker has the file open
        os.chmod(p, 0o644)
    SQLiteStore(path, POLICY, watch()).close()
    assert {stat.S_IMODE(p.stat().st_mode) for p in parts} == {0o600}
    s.close()


# --- a near-copy is answered as its earlier query was; flips deny ----------------------------

def _answer(cls: int, note: str = "") -> str:
    from advguard.serve.state import kept

    return kept({"class": cls, "note": note}, cls)


FLIPS = Policy(window=50, min_requests=20, flagged_limit=0, max_flagged=0, max_repeats=0,
               max_flips=3, window_s=100, cooldown_s=0)


def test_a_near_copy_is_answered_as_its_earlier_query_and_a_resend_as_itself(watched):
    """A camera's frames (near-copies of one scene) are served the first frame's answer once
    the watch has k to compare with, and are never denied by detections alone; the very same
    image sent again gets its own earlier answer; distinct images are answered fresh."""
    s = watched(FLIPS)
    near = codes(30, seed=17, spread=0.01)
    given = [s.admit("camera", [False], [0.9], c[None], now=i,
                     answers=[_answer(4, f"frame {i}")]) for i, c in enumerate(near)]
    assert all(a.answered for a in given) and all(a.answers[0] is None for a in given[:3])
    assert all(a.repeats[0] and a.answers[0] is not None for a in given[3:])
    assert all(list(a.as_before) == [True] for a in given[3:])  # answered as an earlier one
    notes = {json_note(a.answers[0]) for a in given[3:]}
    assert notes <= {f"frame {i}" for i in range(3)}  # an earlier frame's answer, never its own
    again = s.admit("camera", [False], [0.9], near[-1][None], now=40,
                    answers=[_answer(4, "x")])  # the last frame again
    assert not again.repeats[0] and json_note(again.answers[0]) == json_note(given[-1].answers[0])
    far = codes(5, seed=18, spread=10.0)
    fresh = [s.admit("viewer", [False], [0.9], c[None], now=i, answers=[_answer(1)])
             for i, c in enumerate(far)]
    assert all(a.answers[0] is None for a in fresh)


def json_note(answer: str | None) -> str:
    assert answer is not None
    return json.loads(answer)["note"]


def test_near_copies_the_model_would_answer_otherwise_are_flips_and_deny(watched):
    """A probing attack whose near-copy crosses the decision boundary is answered the earlier
    class (it learns nothing) and the crossing counts: the 3rd flip denies."""
    s = watched(FLIPS)
    near = codes(20, seed=19, spread=0.01)
    outcomes = []
    for i, c in enumerate(near):
        a = s.admit("prober", [False], [0.9], c[None], now=i,
                    answers=[_answer(7 if i < 6 else 3)])  # from the 7th on, the model says 3
        outcomes.append(a)
        if not a.answered:
            break
    answered = [a for a in outcomes if a.answered]
    assert [json.loads(a.answers[0])["class"] for a in answered[3:]] == [7] * (len(answered) - 3)
    assert len(outcomes) == 6 + 3 and outcomes[-1].denied_now
    assert outcomes[-1].status.recent_flips == 3 and "another class" in outcomes[-1].status.reason



def test_flips_of_an_attack_spread_over_keys_deny_every_key(watched):
    """Three keys take turns probing one image through the global index: each flip counts on
    the key that sent it and on the keys whose queries it near-copied, so all three are denied
    after about as many flips as one key alone would need."""
    policy = Policy(window=50, min_requests=20, flagged_limit=0, max_flagged=0, max_repeats=0,
                    max_flips=3, window_s=100, cooldown_s=0)
    s = watched(policy, linking())
    keys = ["k1", "k2", "k3"]
    near = codes(60, seed=20, spread=0.01)
    denied_at = {}
    for i, c in enumerate(near):
        key = keys[i % 3]
        if key in denied_at:
            continue
        a = s.admit(key, [False], [0.9], c[None], now=i, answers=[_answer(7 if i < 9 else 3)])
        if not a.answered:
            denied_at[key] = i
        for k in keys:
            if k not in denied_at and s.get(k, now=i).denied(i):
                denied_at[k] = i
        if len(denied_at) == 3:
            break
    assert set(denied_at) == set(keys) and max(denied_at.values()) <= 9 + 6


def test_a_camera_resending_one_flagged_scene_is_one_flagged_image(watched):
    """Frames answered as an earlier frame add no verdict: a camera whose scene the detector
    flags is counted once, not once a frame, so the flagged budget and share do not deny it;
    a client sending as many distinct flagged images is denied."""
    policy = Policy(window=20, min_requests=5, flagged_limit=0.5, max_flagged=5, max_repeats=0,
                    window_s=100, cooldown_s=0)
    s = watched(policy)
    near, far = codes(30, seed=21, spread=0.01), codes(30, seed=22, spread=10.0)
    camera = [s.admit("camera", [True], [0.0], c[None], now=i, answers=[_answer(2)])
              for i, c in enumerate(near)]
    assert all(a.answered for a in camera)
    assert camera[-1].status.recent_flagged == 3 and camera[-1].status.requests == 30
    distinct = [s.admit("odd", [True], [0.0], c[None], now=i, answers=[_answer(2)])
                for i, c in enumerate(far[:6])]
    assert all(a.answered for a in distinct[:4]) and not distinct[4].answered


def test_a_jittering_camera_whose_scene_is_flagged_is_not_denied(watched):
    """A camera that moves by up to 2 pixels between frames sends distinct images to an
    unaligned watch: when the detector flags its scene, every frame is new flagged evidence
    and the budget denies it. Aligned by up to 2 cells (``query_shift``, the default with
    ``query_eps``), its frames are answered as an earlier frame and add no verdict, and it is
    served to the end; a client sending as many distinct flagged digits is still denied."""
    import torch

    from advguard.data import load_dataset
    from advguard.serve.queries import QueryWatch, calibrate, encode

    x = load_dataset("mnist", "test", limit=60).x
    gen = torch.Generator().manual_seed(6)
    frames = []
    for _ in range(60):
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        moved = torch.roll(x[9:10], (dy, dx), dims=(2, 3))  # MNIST's border is blank
        frames.append((moved + 0.02 * torch.randn(moved.shape, generator=gen)).clamp(0, 1))
    camera, distinct = encode(torch.cat(frames)), encode(x)
    policy = Policy(window=50, min_requests=20, flagged_limit=0.6, max_flagged=20,
                    max_repeats=0, window_s=1000, cooldown_s=0)
    served = {}
    for shift in (0, 2):
        w = calibrate(camera[:10], QueryWatch(query_eps=0.3, query_shift=shift,
                                              query_history=100, query_global=0))
        s = watched(policy, w)
        served[shift] = sum(s.admit(f"camera-{shift}", [True], [0.0], c[None], now=i,
                                    answers=[_answer(4)]).answered
                            for i, c in enumerate(camera))
        odd = [s.admit(f"odd-{shift}", [True], [0.0], c[None], now=i, answers=[_answer(4)])
               for i, c in enumerate(distinct)]
        assert sum(a.answered for a in odd) < 25
        s.close()
    assert served[2] == 60 and served[0] < 30


def test_a_near_copy_is_never_vouched_for_beyond_its_own_verdict():
    """A near-copy is told its earlier query's answer (the class and probabilities it already
    had) but trusted only where the query itself would be: the model gives it the same class
    and the detector trusts it. Else — the model now answers another class (a boundary
    search's query told the trusted wrong class of an earlier query beside the ball), or the
    detector flags it — the earlier answer is told flagged, and failing closed, its class is
    withheld; an earlier answer already flagged stays as it was."""
    from advguard.serve.reveal import Reveal, withheld
    from advguard.serve.state import kept, settled, shown

    def answer(cls: int, verdict: str) -> str:
        return kept({"class": cls, "verdict": verdict, "probabilities": [cls / 10],
                     "unlike_training": False}, cls)

    earlier = answer(7, "trusted")
    told = {(cls, verdict): shown(settled(earlier, answer(cls, verdict)))
            for cls, verdict in [(3, "trusted"), (7, "flagged"), (7, "trusted"), (3, "flagged")]}
    as_it_was = {"class": 7, "verdict": "trusted", "probabilities": [0.7],
                 "unlike_training": False}
    assert told[(7, "trusted")] == as_it_was
    for case in [(3, "trusted"), (7, "flagged"), (3, "flagged")]:
        assert told[case] == {**as_it_was, "verdict": "flagged"}, case
    closed = Reveal(flagged_class=False)  # failing closed, as the service tells it
    assert withheld(shown(settled(earlier, answer(3, "trusted"))), closed) == {
        "class": None, "verdict": "flagged", "unlike_training": False}
    assert withheld(shown(settled(earlier, answer(7, "trusted"))), closed) == shown(earlier) == {
        **as_it_was}
    flagged = answer(2, "flagged")
    assert settled(flagged, answer(7, "trusted")) == flagged


def test_a_jittering_colour_camera_is_aligned_through_the_store(watched):
    """The same for a colour camera, whose pooled view is aligned by the moved windows the
    inference thread computes (``moves``), passed through the store's admission: its frames
    are answered as an earlier frame and it is served to the end; without the windows (cells
    of the pooled view moved instead) the flagged budget denies it."""
    from pathlib import Path

    import torch

    from advguard.data import load_dataset
    from advguard.serve.queries import QueryWatch, calibrate, encode

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
    scene = load_dataset("cifar10", "test", limit=5, data_dir=shared).x[4:5]
    gen = torch.Generator().manual_seed(8)
    frames = []
    for _ in range(40):
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        frames.append((torch.roll(scene, (dy, dx), dims=(2, 3))
                       + 0.02 * torch.randn(scene.shape, generator=gen)).clamp(0, 1))
    x = torch.cat(frames)
    codes = encode(x)
    policy = Policy(window=50, min_requests=20, flagged_limit=0.6, max_flagged=15,
                    max_repeats=0, window_s=1000, cooldown_s=0)
    w = calibrate(codes[:10], QueryWatch(query_eps=8 / 255, query_history=100, query_global=0))
    moved = w.windows(x)  # as the service's inference thread computes them
    s = watched(policy, w)
    served = {name: sum(s.admit(name, [True], [0.0], codes[i:i + 1], now=i,
                                answers=[_answer(4)],
                                moved=None if m is None else m[i:i + 1]).answered
                        for i in range(len(codes)))
              for name, m in (("aligned", moved), ("cells", None))}
    assert served == {"aligned": 40, "cells": 14}


def test_a_query_that_flips_a_neighbour_inside_its_ball_is_told_flagged(watched):
    """Square's first stripes or a boundary search's crossing: a query inside the ε-ball of an
    earlier one (fewer than view_k: no detection yet) that the model gives another class is
    answered flagged — its own answer, kept so — and counted as a flip; so are the attack's
    later queries beside it, whichever key sends them, while a query beside earlier ones of
    its own class, and a distinct image, are answered fresh."""
    import torch

    from advguard.data import load_dataset
    from advguard.serve.queries import QueryWatch, calibrate, encode

    x = load_dataset("mnist", "test", limit=40).x
    gen = torch.Generator().manual_seed(21)
    stripes = 0.3 * torch.sign(torch.randn((1, 1, 1, 28), generator=gen))
    probe = torch.cat([x[:1], (x[:1] + stripes).clamp(0, 1), (x[:1] + 0.9 * stripes).clamp(0, 1),
                       (x[:1] + 0.8 * stripes).clamp(0, 1)])
    w = calibrate(encode(x[10:40]), QueryWatch(query_eps=0.3, query_history=100,
                                               query_global=100))
    s = watched(Policy(max_repeats=0, max_flagged=0, flagged_limit=0, max_flips=0), w)
    qs = encode(probe)
    first = s.admit("attacker", [False], [0.9], qs[:1], now=0, answers=[_answer(7)])
    crossing = s.admit("attacker", [False], [0.9], qs[1:2], now=1, answers=[_answer(3, "x")])
    assert first.answers[0] is None and not crossing.repeats[0]
    told = crossing.answers[0]
    assert told is not None and json.loads(told)["verdict"] == "flagged"
    assert json_note(told) == "x" and crossing.status.recent_flips == 1  # its own answer
    assert list(crossing.as_before) == [False]  # told flagged, not answered as an earlier one
    # beside the flagged success, of its class, from another key: flagged too
    again = s.admit("accomplice", [False], [0.9], qs[2:3], now=2, answers=[_answer(3, "y")])
    assert again.answers[0] is not None and json.loads(again.answers[0])["verdict"] == "flagged"
    assert again.status.linked == [] and again.status.recent_flips == 1
    # an honest client: beside earlier queries of its own class, and distinct images
    camera = s.admit("camera", [False], [0.9], encode(x[2:3]), now=3, answers=[_answer(1)])
    frame = s.admit("camera", [False], [0.9],
                    encode((x[2:3] + 0.02 * torch.randn((1, 1, 28, 28), generator=gen))
                           .clamp(0, 1)), now=4, answers=[_answer(1)])
    other = s.admit("camera", [False], [0.9], encode(x[3:4]), now=5, answers=[_answer(0)])
    assert [a.answers[0] for a in (camera, frame, other)] == [None, None, None]
    assert other.status.recent_flips == 0


def test_a_near_copy_beside_an_earlier_query_of_another_class_is_told_flagged():
    """A crop search's cash-in is a near-copy of the cropped query that tempted it (the model
    gave that query the wrong class the cash-in now gets too), so the vouching rule alone
    trusts it; but the earlier queries inside its ball — the image itself, the search's
    earlier crops — were answered with the true class. A near-copy where most of the earlier
    answers inside its ball name another class than the model gives it is told flagged and
    counted as a flip; where most name its own (a camera's frame beside the odd frame the
    model classified otherwise) it is told its nearest's answer as it was; with
    ``flag_beside`` off it is counted, not flagged."""
    import numpy as np

    from advguard.serve.matching import Found
    from advguard.serve.state import watched as settle_watched

    tempting, image = _answer(3, "crop"), _answer(7, "image")
    found = Found(np.array([True, True]), [tempting, tempting], [(), ()],
                  [(tempting, image, image, _answer(7)), (tempting, tempting, image)])
    out = settle_watched(found, [_answer(3, "cash-in"), _answer(3, "frame")])
    assert out.told[0] is not None and json.loads(out.told[0])["verdict"] == "flagged"
    assert json_note(out.told[0]) == "crop" and out.kept[0] == out.told[0]
    assert out.told[1] == tempting and out.flips == 1 and out.as_before == [True, True]
    counted = settle_watched(found, [_answer(3), _answer(3)], flag_beside=False)
    assert counted.told == [tempting, tempting] and counted.flips == 1


def test_an_operator_can_have_flips_beside_counted_but_not_flagged(watched):
    """``--no-flag-beside``: the crossing is answered as the model answers it, and still
    counted as a flip (``--max-flips`` can deny on it)."""
    import torch

    from advguard.data import load_dataset
    from advguard.serve.queries import QueryWatch, calibrate, encode

    x = load_dataset("mnist", "test", limit=40).x
    stripes = 0.3 * torch.sign(torch.randn((1, 1, 1, 28), generator=torch.Generator()
                                           .manual_seed(21)))
    w = calibrate(encode(x[10:40]), QueryWatch(query_eps=0.3, query_history=100,
                                               query_global=100))
    s = watched(Policy(max_repeats=0, max_flagged=0, flagged_limit=0, max_flips=0,
                       flag_beside=False), w)
    s.admit("attacker", [False], [0.9], encode(x[:1]), now=0, answers=[_answer(7)])
    crossing = s.admit("attacker", [False], [0.9], encode((x[:1] + stripes).clamp(0, 1)),
                       now=1, answers=[_answer(3)])
    assert crossing.answers[0] is None and crossing.status.recent_flips == 1


def test_a_sqlite_store_reads_again_what_another_connection_changed_between_admissions(
        tmp_path):
    """Between two of a store's own transactions nothing is read to check its copies, unless
    SQLite's data_version says another connection committed: rows deleted by hand are seen."""
    import sqlite3

    s = SQLiteStore(tmp_path / "v.db", Policy(max_repeats=0, max_flagged=0, flagged_limit=0),
                    watch(history=8))
    near = codes(6, seed=16, spread=0.01)
    assert [bool(s.admit("q", [False], [0.9], near[i][None], now=i).repeats[0])
            for i in range(4)] == [False] * 3 + [True]
    with sqlite3.connect(tmp_path / "v.db") as db:
        db.execute("DELETE FROM queries WHERE client = 'q'")
    assert not s.admit("q", [False], [0.9], near[4][None], now=5).repeats[0]


def test_a_sqlite_worker_checks_every_copy_after_another_wrote_not_only_those_it_reads(
        tmp_path):
    """After another worker wrote, a transaction checks only the copies it reads; the others
    are checked when next used: a history cleared by worker b while worker a admitted other
    clients, and index rows b added while a ran a transaction that read no index."""
    quiet = Policy(max_repeats=0, max_flagged=0, flagged_limit=0)
    a, b = (SQLiteStore(tmp_path / "e.db", quiet, linking()) for _ in range(2))
    near, far = codes(8, seed=17, spread=0.01), codes(8, seed=18, spread=10.0)
    for i in range(3):
        a.admit("q", [False], [0.9], near[i][None], now=i)  # a's copy of q: 3 near-copies
    b.clear("q")
    a.admit("p", [False], [0.9], far[0][None], now=4)  # checks p's history, not q's
    assert not a.admit("q", [False], [0.9], near[3][None], now=5).repeats[0]
    other = codes(8, seed=19, spread=0.01)
    for i in range(3):
        b.admit(f"x{i}", [False], [0.9], other[i][None], now=6 + i)  # index rows via b
    a.record("r", [False], [0.9], now=9)  # a transaction that reads no index
    found = a.admit("y", [False], [0.9], other[3][None], now=10)
    assert found.repeats[0] and found.status.linked == ["x0", "x1", "x2"]
