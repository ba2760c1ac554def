"""The guard in production (SPEC B6, paper 003 §5.1): guard folders, the HTTP service, and the
per-client policy that isolates sources of adversarial inputs."""

from advguard.serve.guard import Client, Guard, GuardConfig, fit_guard, read_keys, write_keys
from advguard.serve.policy import ClientStatus, Policy
from advguard.serve.stores import RedisStore, SQLiteStore, open_store

__all__ = ["Client", "ClientStatus", "Guard", "GuardConfig", "Policy", "RedisStore",
           "SQLiteStore", "fit_guard", "open_store", "read_keys", "write_keys"]
