"""``advguard guard fit`` (a guard folder from a trained model) and ``advguard serve`` (the
HTTP service)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from advguard.cli import app, setup_logging
from advguard.cli.options import Quiet, field_help, with_configs
from advguard.data import DataOptions
from advguard.detection import DetectorSettings
from advguard.models import ModelOptions
from advguard.serve.app import Settings
from advguard.serve.guard import GuardFit
from advguard.serve.limits import Limits
from advguard.serve.policy import Policy
from advguard.serve.queries import QueryWatch
from advguard.serve.reveal import Reveal

guard_app = typer.Typer(help="Guard folders: a model with its fitted detector.",
                        no_args_is_help=True)
app.add_typer(guard_app, name="guard")


@guard_app.command("fit")
@with_configs(detector=DetectorSettings, fit=GuardFit, watch=QueryWatch, data=DataOptions,
              model_options=ModelOptions)
def fit(
    detector: Any,
    fit: GuardFit,
    watch: QueryWatch,
    data: DataOptions,
    model_options: ModelOptions,
    out: Annotated[Path, typer.Option(help="the guard folder to write")],
    checkpoint: Annotated[Path | None, typer.Argument(
        help="a model or ensemble checkpoint, or a reproduce detect run directory; or leave it "
             "out and give --model (with --weights) and --data")] = None,
    quiet: Quiet = False,
) -> None:
    """Fit the detector (--detector; the paper's kNN by default; an option another detector has
    is refused) on the model's training-set features (streamed), fit what it fits on held-out
    images (the kNN's bank-distance limit), its threshold and the query watch on validation
    images held out of them, and write a self-contained guard folder."""
    from advguard.serve.guard import KEYS, fit_guard, read_keys

    setup_logging(quiet)
    g = fit_guard(checkpoint, out, detector=detector, fit=fit, model=model_options, data=data,
                  watch=watch, progress=not quiet)
    c = g.config
    q = c.queries or {}
    layers = ", ".join(c.layers or []) or "none (the logits)"
    typer.echo(f"{out}: {c.dataset} {c.detector} guard, layers {layers} "
               f"({_pairs(c.settings)}), threshold {c.threshold:.4f} keeps "
               f"{100 * c.calibration_kept:.1f}% of {c.calibration_images} clean validation "
               f"images; " + (f"fitted on them: {_pairs(c.fitted)}; " if c.fitted else "")
               + "query watch: k = "
               f"{q.get('query_k')}, thresholds {_num(q.get('threshold'))} (L2) and "
               f"{_num(q.get('view_threshold'))} (L∞)"
               + (f", global index of {q['query_global']}: {_num(q.get('global_threshold'))} "
                  f"and {_num(q.get('global_view_threshold'))}" if q.get("query_global") else "")
               + (f", the ball of ε = {q['query_eps']:g}" if q.get("query_eps") else
                  f", at {100 * q.get('query_false_alarm', 0):g}% false alarms"))
    admins = [key for key, who in read_keys(out / KEYS).items() if who.admin]
    typer.echo(f"API keys: {out / KEYS} (admin key {admins[0]})")


def _pairs(values: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in (values or {}).items()) or "no options"


def _num(value: float | None) -> str:
    return "off" if value is None else f"{value:.4f}"


@app.command()
@with_configs(policy=Policy, reveal=Reveal, limits=Limits)
def serve(
    policy: Policy,
    reveal: Reveal,
    limits: Limits,
    guard_dir: Annotated[Path, typer.Argument(help="a guard folder (advguard guard fit)")],
    host: str = "127.0.0.1",
    port: int = 8000,
    keys: Annotated[Path | None, typer.Option(help="API keys (default: GUARD_DIR/keys.json)")]
    = None,
    state: Annotated[str | None, typer.Option(
        help="client state: sqlite:///FILE (default: GUARD_DIR/clients.db) or "
             "redis://HOST:PORT/DB")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    threads: Annotated[int | None, typer.Option(
        help="torch threads in each worker (default: the CPU cores this process may use, "
             "shared among the workers)")] = None,
    query_watch: Annotated[bool, typer.Option(
        help="deny clients whose queries are near-copies of their recent ones (query-based "
             "black-box attacks; calibrated by guard fit)")] = Settings.query_watch,
    reset_state: Annotated[bool, typer.Option(
        "--reset-state", help="move the SQLite client state aside (a copy is kept beside it) "
                              "and start with an empty one")] = False,
    trust_builder: Annotated[bool, typer.Option(help=field_help(ModelOptions, "trust_builder"))]
    = False,
) -> None:
    """Serve the guard over HTTP: POST /v1/predict, GET /v1/health, /v1/clients, /metrics, a
    web page at /, the OpenAPI schema at /docs."""
    import functools
    import math
    import os

    import uvicorn

    from advguard.errors import InputError
    from advguard.serve.app import ENV, worker_threads
    from advguard.serve.guard import Guard, read_keys
    from advguard.serve.http import TimedHTTPProtocol
    from advguard.serve.stores import open_store, reset_sqlite, sqlite_path

    if not 0 < port < 65536:
        raise InputError(f"port must be in 1..65535, got {port}")
    if workers < 1:
        raise InputError(f"workers must be ≥ 1, got {workers}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be ≥ 1, got {threads}")
    threads = worker_threads(workers, threads)
    settings = Settings(guard_dir=str(guard_dir.resolve()),
                        keys=None if keys is None else str(keys.resolve()), state=state,
                        policy=policy, reveal=reveal, query_watch=query_watch, limits=limits,
                        trust_builder=trust_builder, threads=threads)
    Guard.load(guard_dir, trust_builder=trust_builder)  # every file checked before a worker
    read_keys(keys or guard_dir / "keys.json")
    if reset_state:
        path = sqlite_path(state, guard_dir / "clients.db")
        if path is None:
            raise InputError("--reset-state is for SQLite client state (sqlite:///FILE); "
                             "clear Redis keys with the admin endpoint or redis-cli")
        copy = reset_sqlite(path)
        typer.echo(f"client state {path} starts empty" + ("" if copy is None else
                                                          f"; the old one is at {copy}"))
    open_store(state, guard_dir / "clients.db", settings.policy).close()  # checks itself
    os.environ[ENV] = settings.to_env()
    uvicorn.run("advguard.serve.app:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level="info", access_log=False,
                http=functools.partial(TimedHTTPProtocol,  # type: ignore[arg-type]
                                       header_timeout=settings.limits.header_timeout_s),
                timeout_keep_alive=math.ceil(settings.limits.keep_alive_s),
                limit_concurrency=settings.limits.max_connections)
