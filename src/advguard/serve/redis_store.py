"""Client state on a Redis server, shared by every replica of the service: every update one Lua
script, atomic on the server (the same semantics as :class:`~advguard.serve.stores.SQLiteStore`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from urllib.parse import urlparse

from advguard.errors import StateError
from advguard.serve.policy import CheckedStore, ClientStatus, Policy, reason, reporting

# KEYS: client hash, verdict list, client set. ARGV: client, now, window, min_requests,
# flagged_limit, cooldown (0 = until cleared), then flagged/score pairs.
_RECORD = """
local h, v, all = KEYS[1], KEYS[2], KEYS[3]
local now, window, minreq = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local limit, cooldown = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('SADD', all, ARGV[1])
local denied = redis.call('HGET', h, 'denied_until')
if denied and denied ~= 'inf' and now >= tonumber(denied) then
  redis.call('HDEL', h, 'denied_until', 'reason'); redis.call('DEL', v); denied = false
end
local n, bad = 0, 0
for i = 7, #ARGV, 2 do
  redis.call('LPUSH', v, ARGV[i] .. ':' .. ARGV[i + 1]); n = n + 1
  bad = bad + tonumber(ARGV[i])
end
redis.call('LTRIM', v, 0, window - 1)
redis.call('HINCRBY', h, 'requests', n); redis.call('HINCRBY', h, 'flagged', bad)
redis.call('HSET', h, 'last_seen', ARGV[2])
local items = redis.call('LRANGE', v, 0, -1)
local count, flagged = #items, 0
for _, item in ipairs(items) do flagged = flagged + tonumber(string.sub(item, 1, 1)) end
if (not denied) and count >= minreq and flagged >= limit * count then
  local t = 'inf'
  if cooldown > 0 then t = tostring(now + cooldown) end
  redis.call('HSET', h, 'denied_until', t, 'reason', flagged .. '/' .. count)
  redis.call('HINCRBY', h, 'denials', 1)
end
return 1
"""

_EXPIRE = """
local denied = redis.call('HGET', KEYS[1], 'denied_until')
if denied and denied ~= 'inf' and tonumber(ARGV[1]) >= tonumber(denied) then
  redis.call('HDEL', KEYS[1], 'denied_until', 'reason'); redis.call('DEL', KEYS[2])
end
return 1
"""


class RedisStore(CheckedStore):
    """Client state on a Redis server (``redis://host:port/db``), shared by every replica."""

    kind = "redis"

    def __init__(self, url: str, policy: Policy, prefix: str = "advguard") -> None:
        import redis

        self.policy = policy
        self.prefix = prefix
        parsed = urlparse(url)  # named without its password
        self.where = f"Redis at {parsed.hostname or parsed.path}:{parsed.port or 6379}"
        self.backend_errors = (redis.RedisError,)
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                          socket_connect_timeout=5)
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise StateError(f"cannot reach {self.where}: {exc}") from None
        self._record = self.redis.register_script(_RECORD)
        self._expire = self.redis.register_script(_EXPIRE)

    def _keys(self, client: str) -> list[str]:
        return [f"{self.prefix}:client:{client}", f"{self.prefix}:verdicts:{client}",
                f"{self.prefix}:clients"]

    @reporting
    def record(self, client: str, flagged: Sequence[bool], scores: Sequence[float],
               now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        p = self.policy
        pairs: list[str] = []
        for f, s in zip(flagged, scores, strict=True):
            pairs += [str(int(f)), repr(float(s))]
        self._record(keys=self._keys(client),
                     args=[client, repr(now), p.window, p.min_requests, repr(p.flagged_limit),
                           repr(p.cooldown_s), *pairs])
        return self.get(client, now)

    @reporting
    def get(self, client: str, now: float | None = None) -> ClientStatus:
        now = time.time() if now is None else now
        h, v, _ = self._keys(client)
        self._expire(keys=[h, v], args=[repr(now)])
        info: dict[str, str] = self.redis.hgetall(h)  # type: ignore[assignment]
        items: list[str] = self.redis.lrange(v, 0, -1)  # type: ignore[assignment]
        if not info:
            return ClientStatus(client, 0, 0, 0, 0, 1.0, None, None, 0, None)
        flags = [int(i.split(":", 1)[0]) for i in items]
        scores = [float(i.split(":", 1)[1]) for i in items]
        until = info.get("denied_until")
        why = None
        if until is not None:
            bad, count = (int(t) for t in info.get("reason", "0/0").split("/"))
            why = reason(bad, count, self.policy)
        return ClientStatus(
            client, int(info.get("requests", 0)), int(info.get("flagged", 0)), len(items),
            sum(flags), sum(scores) / len(scores) if scores else 1.0,
            None if until is None else float(until), why, int(info.get("denials", 0)),
            float(info["last_seen"]) if "last_seen" in info else None)

    @reporting
    def clients(self, now: float | None = None) -> list[ClientStatus]:
        names: set[str] = self.redis.smembers(self._keys("")[2])  # type: ignore[assignment]
        return [self.get(c, now) for c in sorted(names)]

    @reporting
    def clear(self, client: str) -> ClientStatus:
        h, v, _ = self._keys(client)
        self.redis.hdel(h, "denied_until", "reason")
        self.redis.delete(v)
        return self.get(client)

    @reporting
    def probe(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()
