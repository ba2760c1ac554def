"""The evaluation commands, each over a whole evaluation set, streamed image by image,
resumable (``--out``) and split over torchrun's ranks: ``evaluate`` (a robustness curve),
``audit`` (AutoAttack and the masking checks) and ``audit-merge`` (runs of one model and plan,
merged image by image)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from advguard import options as opts
from advguard.attacks import norm_named
from advguard.cli import app, setup_logging
from advguard.cli.commands import CHECKPOINT_HELP
from advguard.cli.options import Quiet, with_configs
from advguard.data import DataOptions
from advguard.errors import InputError
from advguard.evaluation.options import AuditOptions, EvaluateOptions
from advguard.io import check_output
from advguard.models import ModelOptions
from advguard.options import check_int


@app.command()
@with_configs(data=DataOptions, model_options=ModelOptions, options=AuditOptions)
def audit(
    data: DataOptions,
    model_options: ModelOptions,
    options: AuditOptions,
    checkpoint: Annotated[Path | None, typer.Argument(help=CHECKPOINT_HELP)] = None,
    transfer_from: Annotated[list[Path] | None, typer.Option(
        help="other models whose PGD examples are transferred (black-box check); repeatable")]
    = None,
    out: Annotated[Path | None, typer.Option(
        help="write the report as JSON here; each finished piece goes to OUT's .parts folder, "
             "and the same command resumes from it")] = None,
    parts: Annotated[Path | None, typer.Option(
        help="where the finished pieces go (default: next to --out, OUT.parts)")] = None,
    quiet: Quiet = False,
) -> None:
    """Audit a white-box robustness claim: AutoAttack (standard: APGD-CE, APGD-T, FAB-T,
    Square), advguard's PGD, torchattacks' PGD and APGD (CE, DLR), a PGD step sweep, black-box
    transfer, zero gradients and an unbounded attack — image by image over the whole split
    (or --test-limit), resumable with --out, and split over the ranks under torchrun."""
    from advguard import distributed
    from advguard.data.loading import fitting_batch
    from advguard.ensemble import load_any, open_model
    from advguard.evaluation import AuditPlan, run_shards
    from advguard.io import write_json

    device = opts.device(options.device)
    distributed.setup(device)
    setup_logging(quiet or not distributed.is_main())
    device = distributed.device_for_rank(device)
    if out is not None:
        check_output(out)
        parts = parts or parts_of(out)
    check_int("--shard-size", options.shard_size)
    norm_named(options.norm)
    model, meta, data = open_model(checkpoint, model_options, data)
    norm_named(options.norm).check(options.eps, data.info().shape)  # L2: the cube's diameter
    test = data.load_evaluation(options.test_limit, options.test_start)
    sources = {p.name: load_any(p)[0] for p in transfer_from or []}
    plan = AuditPlan.make(options.eps, pgd=options.pgd(), suite=not options.only_autoattack,
                          autoattack=options.reference(), sources=sources, seed=options.seed,
                          norm=options.norm)
    shard = fitting_batch(test, options.shard_size)
    manifest: dict[str, Any] = {
        "kind": "audit", "model": provenance(model, checkpoint, model_options),
                "data": {**data.to_json(), "split": data.split},
                "data_slice": {"start": options.test_start, "images": len(test)},
                "plan": plan.describe(), "shard_size": shard}
    model = model.to(device)
    outcomes = run_shards(
        plan.batch(model, device), test, shard_size=shard, first_row=options.test_start,
        directory=parts, manifest=manifest, workers=data.workers,
        progress=not quiet and distributed.is_main(), desc=f"audit ε={options.eps:g}",
        running=_RunningRobust(), extra=_where(device))
    if not distributed.is_main():
        return
    report = plan.report(outcomes)
    name = checkpoint.name if checkpoint is not None else model_options.model
    typer.echo(f"{name}: {plan.norm} ε = {options.eps:g}, {report.images} {data.split} images "
               f"({_sha(manifest['model'])})")
    render(report)
    if out is not None:
        write_json(out, {**manifest, "checkpoint": str(checkpoint or model_options.model),
                         "parts": str(parts), **report.to_json()})


@app.command()
@with_configs(data=DataOptions, model_options=ModelOptions, options=EvaluateOptions)
def evaluate(
    data: DataOptions,
    model_options: ModelOptions,
    options: EvaluateOptions,
    checkpoint: Annotated[Path | None, typer.Argument(help=CHECKPOINT_HELP)] = None,
    crafter: Annotated[Path | None, typer.Option(help="crafting model (transfer-fgsm)")] = None,
    out: Annotated[Path | None, typer.Option(
        help="write the curve as JSON here (finished pieces in OUT.parts: the same command "
             "resumes)")] = None,
    quiet: Quiet = False,
) -> None:
    """Accuracy vs. strength of a saved model under one attack, over the whole split (or
    --test-limit), streamed."""
    from advguard import distributed
    from advguard.data.loading import fitting_batch
    from advguard.ensemble import load_any, open_model
    from advguard.evaluation import grid_mean, run_shards
    from advguard.evaluation.robustness import curve_batch, strength_column
    from advguard.io import write_json

    threat, device = options.attack, opts.device(options.device)
    distributed.setup(device)
    setup_logging(quiet or not distributed.is_main())
    device = distributed.device_for_rank(device)
    parts = None
    if out is not None:
        check_output(out)
        parts = parts_of(out)
    model, meta, data = open_model(checkpoint, model_options, data)
    test = data.load_evaluation(options.test_limit, options.test_start)
    if options.norm != "linf" and not options.grid:
        raise InputError(f"give --grid for {options.norm} (the data's default grid is L∞), "
                         "e.g. --grid 0,0.5,1,1.5,2,2.5,3 on MNIST")
    strengths, said = _grid(options.grid, data.info().grid, meta)
    for eps in strengths:
        norm_named(options.norm).check(eps, data.info().shape)
    crafting = None
    if threat.transfer:
        if crafter is None:
            raise InputError(f"{threat.value} needs --crafter CHECKPOINT (the crafting model)")
        crafting = load_any(crafter)[0].to(device)
    model = model.to(device)
    shard = fitting_batch(test, 500)
    manifest: dict[str, Any] = {
        "kind": "evaluate", "model": provenance(model, checkpoint, model_options),
        "crafter": provenance(crafting, crafter, ModelOptions()) if crafting else None,
        "data": {**data.to_json(), "split": data.split},
        "data_slice": {"start": options.test_start, "images": len(test)},
        "attack": threat.value, "norm": options.norm, "grid": strengths, "seed": options.seed,
        "pgd": {"steps": options.pgd_steps, "restarts": options.pgd_restarts},
        "shard_size": shard}
    outcomes = run_shards(
        curve_batch(model, strengths, threat, pgd=options.pgd(), crafter=crafting,
                    device=device, norm=options.norm), test, shard_size=shard,
        first_row=options.test_start,
        directory=parts, manifest=manifest, workers=data.workers,
        progress=not quiet and distributed.is_main(), desc=f"{threat.value} curve",
        extra=_where(device))
    if not distributed.is_main():
        return
    curve = [int(outcomes.columns[strength_column(e)].sum()) / len(outcomes) for e in strengths]
    result = {**manifest, "checkpoint": str(checkpoint or model_options.model),
              "dataset": data.info().name, "split": data.split, "hold_out": data.hold_out,
              "test_start": options.test_start, "images": len(outcomes), "grid_chosen": said,
              "curve": curve, "mean": grid_mean(curve)}
    if out is not None:
        write_json(out, result)
    typer.echo(f"{len(outcomes)} {data.split} images ({_sha(manifest['model'])}); grid: {said}")
    for eps, acc in zip(strengths, curve, strict=True):
        typer.echo(f"eps={eps:.4g}\taccuracy={acc:.4f}")
    typer.echo(f"grid mean ({threat.value}): {result['mean']:.4f}")


def _grid(chosen: tuple[float, ...], default: tuple[float, ...], meta: dict[str, Any]
          ) -> tuple[list[float], str]:
    """The strengths evaluated, and where they come from: ``--grid``, or the data's default
    grid — extended, in its own step, to the strongest strength the model was trained at."""
    if chosen:
        return list(chosen), "--grid"
    from advguard.data.datasets import strength_grid

    grid = list(default)
    trained = [float(s) for s in meta.get("strengths") or [] if s]
    if trained and max(trained) > grid[-1] + 1e-9 and len(grid) > 1:
        step = grid[1] - grid[0]
        grid = strength_grid(step * -(-max(trained) // step), step)
        return grid, (f"the data's default, extended to the model's training strength "
                      f"{max(trained):g}")
    return grid, "the data's default"


@app.command("audit-merge")
def audit_merge(
    runs: Annotated[list[Path], typer.Argument(
        help="the .parts folders of audits of one model and plan (other slices, machines)")],
    out: Annotated[Path | None, typer.Option(help="write the merged report as JSON here")]
    = None,
) -> None:
    """Merge audits of one model and plan image by image (a run of another model file, other
    attacks or another seed is refused) and report over their union."""
    from advguard.evaluation import read_run
    from advguard.evaluation.audit import summarise
    from advguard.io import write_json

    if out is not None:
        check_output(out)
    manifest, outcomes = read_run(runs)
    report = summarise(manifest["plan"], outcomes)
    typer.echo(f"{len(runs)} runs, {report.images} images ({_sha(manifest['model'])})")
    render(report)
    if out is not None:
        write_json(out, {**manifest, "parts": [str(r) for r in runs], **report.to_json()})


def provenance(model: Any, checkpoint: Path | None, options: ModelOptions) -> dict[str, Any]:
    """What a result was measured on: the sha256 of the model's weights (and of its file)."""
    from advguard.io import file_sha256, state_sha256

    source = checkpoint or (Path(options.weights) if options.weights else None)
    return {"state_sha256": state_sha256(model),
            "file_sha256": file_sha256(source) if source is not None else None,
            "builder": None if checkpoint is not None else options.model}


def parts_of(out: Path) -> Path:
    """Where the finished pieces of a run writing ``out`` go: ``OUT.parts`` beside it."""
    return out.with_name(out.name.removesuffix(".json") + ".parts")


def _sha(model: dict[str, Any]) -> str:
    if model.get("file_sha256"):
        return f"model file sha256 {model['file_sha256'][:16]}…"
    return f"weights sha256 {model['state_sha256'][:16]}…"


def _where(device: str) -> dict[str, Any]:
    import torch

    from advguard import __version__, distributed
    return {"device": device, "torch": torch.__version__, "advguard": __version__,
            "rank": distributed.rank()}


class _RunningRobust:
    """The progress bar's text: AutoAttack's robust accuracy over the pieces seen so far."""

    def __init__(self) -> None:
        self.robust = self.images = 0

    def __call__(self, piece: Any) -> str:
        self.robust += int(piece.columns["AutoAttack Square"].sum())
        self.images += len(piece)
        return f"AutoAttack robust {100 * self.robust / self.images:.1f}% of {self.images}"


def render(report: Any) -> None:
    typer.echo(f"  clean accuracy                 {100 * report.clean_accuracy:6.2f}%")
    for name, acc in report.attacks.items():
        typer.echo(f"  {name:<30} {100 * acc:6.2f}%")
    aa = report.autoattack or {}
    for name, acc in aa.get("robust_after", {}).items():
        typer.echo(f"    AutoAttack after {name:<13} {100 * acc:6.2f}%")
    if aa.get("square_alone_accuracy") is not None:
        typer.echo(f"    Square (black-box) alone       {100 * aa['square_alone_accuracy']:6.2f}%")
    typer.echo(f"  worst case over all attacks    {100 * report.worst_case_accuracy:6.2f}% "
               f"± {100 * report.standard_error:.2f} (standard error)")
    for name, acc in report.transfer.items():
        typer.echo(f"  transfer from {name:<16} {100 * acc:6.2f}%")
    typer.echo(f"  zero-gradient inputs           {100 * report.zero_gradient_fraction:6.2f}%")
    typer.echo(f"  unbounded PGD (whole cube)     {100 * report.unbounded_accuracy:6.2f}%")
    typer.echo("  warnings: " + ("; ".join(report.warnings) or "none"))
    typer.echo("  gradient masking: " + ("signal, see the warnings" if report.masking_signal
                                         else "no signal"))
