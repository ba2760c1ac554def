"""The single-model commands: train, evaluate, audit, select-strengths, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from advguard import options as opts
from advguard.cli import app, setup_logging
from advguard.cli.options import Quiet, config_command, with_configs
from advguard.cli.options import option_param as opts_param
from advguard.data import DataOptions
from advguard.errors import InputError, parse_choice
from advguard.evaluation.options import AuditOptions, EvaluateOptions
from advguard.io import check_output
from advguard.models import ModelOptions
from advguard.strengths import SelectOptions
from advguard.training import Method, TrainConfig, TrainJob


def _train(data: DataOptions, model: ModelOptions, job: TrainJob, overrides: dict[str, Any], *,
           out: Path, quiet: bool) -> None:
    """Train one model: clean, single-strength or mixed MAT (transfer or white-box), any model
    (--model torchvision:resnet18, timm:…, package.module:factory) on any data (--data
    imagefolder:PATH). Runs unchanged under torchrun --nproc_per_node=N
    (DistributedDataParallel, rank 0 writes)."""
    from advguard import distributed
    from advguard.training import train_job

    distributed.setup(opts.device(overrides.get("device", TrainConfig.device)))  # auto: CUDA?
    setup_logging(quiet or not distributed.is_main())
    done = train_job(out, job, model, data, overrides, progress=not quiet)
    if done is not None:
        typer.echo(f"{out}: clean test accuracy {done.test_accuracy:.4f}, "
                   f"{done.seconds:.1f} s")


app.command("train")(config_command(
    (DataOptions, ModelOptions, TrainJob, TrainConfig), _train,
    [opts_param("out", Annotated[Path, typer.Argument(help="where to write the model "
                                                       "(.safetensors)")]),
     opts_param("quiet", Quiet, False)],
    partial=(TrainConfig,)))


CHECKPOINT_HELP = ("model or ensemble (.safetensors); or leave it out and give --model (with "
                   "--weights) and --data")


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
    out: Annotated[Path | None, typer.Option(help="write the report as JSON here")] = None,
    quiet: Quiet = False,
) -> None:
    """Audit a white-box robustness claim: AutoAttack (standard: APGD-CE, APGD-T, FAB-T,
    Square), advguard's PGD, torchattacks' PGD and APGD (CE, DLR), a PGD step sweep, black-box
    transfer, zero gradients and an unbounded attack."""
    from advguard.data import materialise
    from advguard.ensemble import load_any, open_model
    from advguard.evaluation import audit as run_audit
    from advguard.io import write_json

    setup_logging(quiet)
    pgd, reference, strength = options.pgd(), options.reference(), options.eps
    opts.device(options.device)
    if out is not None:
        check_output(out)
    model, meta, data = open_model(checkpoint, model_options, data)
    test = materialise(data.load_evaluation(options.test_limit, options.test_start),
                       workers=data.workers)
    sources = {p.name: load_any(p)[0] for p in transfer_from or []}
    report = run_audit(model, test.x, test.y, strength,
                       pgd=pgd, suite=not options.only_autoattack, autoattack=reference,
                       sources=sources, device=options.device, seed=options.seed,
                       progress=not quiet)
    name = checkpoint.name if checkpoint is not None else model_options.model
    typer.echo(f"{name}: ε = {strength:g}, {report.images} {data.split} images")
    typer.echo(f"  clean accuracy                 {100 * report.clean_accuracy:6.2f}%")
    for name, acc in report.attacks.items():
        typer.echo(f"  {name:<30} {100 * acc:6.2f}%")
    aa = report.autoattack or {}
    for name, acc in aa.get("robust_after", {}).items():
        typer.echo(f"    AutoAttack after {name:<13} {100 * acc:6.2f}%")
    if aa.get("square_alone_accuracy") is not None:
        typer.echo(f"    Square (black-box) alone       {100 * aa['square_alone_accuracy']:6.2f}%")
    typer.echo(f"  worst case over all attacks    {100 * report.worst_case_accuracy:6.2f}%")
    for name, acc in report.transfer.items():
        typer.echo(f"  transfer from {name:<16} {100 * acc:6.2f}%")
    typer.echo(f"  zero-gradient inputs           {100 * report.zero_gradient_fraction:6.2f}%")
    typer.echo(f"  unbounded PGD (ε = 1)          {100 * report.unbounded_accuracy:6.2f}%")
    typer.echo("  warnings: " + ("; ".join(report.warnings) or "none"))
    typer.echo("  gradient masking: " + ("signal, see the warnings" if report.masking_signal
                                         else "no signal"))
    if out is not None:
        write_json(out, {"checkpoint": str(checkpoint or model_options.model),
                         "split": data.split, "hold_out": data.hold_out,
                         "test_start": options.test_start, **report.to_json()})


@app.command()
@with_configs(data=DataOptions, model_options=ModelOptions, options=EvaluateOptions)
def evaluate(
    data: DataOptions,
    model_options: ModelOptions,
    options: EvaluateOptions,
    checkpoint: Annotated[Path | None, typer.Argument(help=CHECKPOINT_HELP)] = None,
    crafter: Annotated[Path | None, typer.Option(help="crafting model (transfer-fgsm)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the curve as JSON here")] = None,
    quiet: Quiet = False,
) -> None:
    """Accuracy vs. strength of a saved model under one attack."""
    from advguard.data import materialise
    from advguard.ensemble import load_any, open_model
    from advguard.evaluation import ThreatSetting, fgsm_curve, grid_mean, pgd_curve
    from advguard.io import write_json

    setup_logging(quiet)
    pgd, threat, device = options.pgd(), options.attack, options.device
    opts.device(device)
    if out is not None:
        check_output(out)
    chosen = options.grid or None
    model, meta, data = open_model(checkpoint, model_options, data)
    test = materialise(data.load_evaluation(options.test_limit, options.test_start),
                       workers=data.workers)
    strengths = list(test.info.grid if chosen is None else chosen)
    kw: dict[str, Any] = {"device": device, "progress": not quiet}
    if threat is ThreatSetting.WHITE_BOX_PGD:
        curve = pgd_curve(model, test.x, test.y, strengths, pgd, **kw)
    else:
        crafting = None
        if threat is ThreatSetting.TRANSFER_FGSM:
            if crafter is None:
                raise InputError("transfer-fgsm needs --crafter CHECKPOINT (the crafting model)")
            crafting = load_any(crafter)[0]
        curve = fgsm_curve(model, test.x, test.y, strengths, crafter=crafting, **kw)
    result = {"checkpoint": str(checkpoint or model_options.model), "dataset": test.info.name,
              "attack": threat.value, "split": data.split, "hold_out": data.hold_out,
              "test_start": options.test_start, "images": len(test),
              "grid": strengths, "curve": curve, "mean": grid_mean(curve)}
    if out is not None:
        write_json(out, result)
    for eps, acc in zip(strengths, curve, strict=True):
        typer.echo(f"eps={eps:.4g}\taccuracy={acc:.4f}")
    typer.echo(f"grid mean ({threat.value}): {result['mean']:.4f}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a finished reproduce run directory")],
) -> None:
    """Write RUN_DIR/report.html: one self-contained page of the run (config, threat settings,
    curves, tables beside the papers', strength selection, audits, detection figures)."""
    from advguard.reports import write_html_report

    typer.echo(write_html_report(run_dir))


@app.command("select-strengths")
@with_configs(options=SelectOptions)
def select_strengths(
    options: SelectOptions,
    source: Annotated[Path, typer.Argument(
        help="a run directory, or a JSON file {\"strengths\": [...], \"matrix\": [[...]]}")],
) -> None:
    """Random-walk strength selection on an accuracy matrix, checked against the exact
    optimum of the same G (paper §4.3)."""
    from advguard.io import read_json
    from advguard.strengths import agreement_rate, exhaustive_select, random_walk_select

    walks, walk_steps, penalty = options.walks, options.walk_steps, options.penalty
    seed, seeds = options.seed, options.seeds
    combo = parse_choice(Method, options.combination, "combination")
    obj = read_json(source / "checkpoints" / "selection.json" if source.is_dir() else source)
    if not isinstance(obj, dict):
        raise InputError(f"{source} must hold a JSON object {{\"matrix\": [[...]], "
                         "\"strengths\": [...]}}")
    if "matrix" not in obj:
        raise InputError(f"{source} holds no accuracy matrix (hand-picked strengths?)")
    strengths = obj.get("candidates") or obj.get("strengths")
    matrix = obj["matrix"]
    walk = random_walk_select(matrix, walks=walks, steps=walk_steps, penalty=penalty,
                              combination=combo, seed=seed)
    exact = exhaustive_select(matrix, penalty=penalty, combination=combo)
    rate = agreement_rate(matrix, range(seeds), walks=walks, steps=walk_steps, penalty=penalty,
                          combination=combo)

    def names(subset: tuple[int, ...]) -> str:
        return ", ".join(f"{strengths[i]:.4g}" for i in subset) if strengths else str(subset)

    typer.echo(f"random walk ({walks} walks x {walk_steps} steps, seed {seed}): "
               f"{{{names(walk.subset)}}}  G={walk.G:.5f}  H={walk.H:.5f}")
    typer.echo(f"exact optimum: {{{names(exact.subset)}}}  G={exact.G:.5f}  H={exact.H:.5f}")
    typer.echo(f"agree: {'yes' if walk.subset == exact.subset else 'no'}; "
               f"the walk finds the optimum for {100 * rate:.0f}% of {seeds} seeds")


@app.command()
@with_configs(model_options=ModelOptions)
def predict(
    model_options: ModelOptions,
    paths: Annotated[list[Path], typer.Argument(
        help="CHECKPOINT IMAGES.npy, or IMAGES.npy alone with --model (and --weights) and "
             "--data; the images an array (N, C, H, W) float in [0, 1]", show_default=False)],
    data: Annotated[str | None, typer.Option(
        help="with --model: the data whose shape and classes the model takes")] = None,
) -> None:
    """Classify images stored as a NumPy array."""
    if len(paths) not in (1, 2):
        raise InputError(f"give CHECKPOINT IMAGES.npy or IMAGES.npy, got {len(paths)} paths")
    checkpoint, images = (None, paths[0]) if len(paths) == 1 else paths
    from advguard.data.images import images_from_array, read_npy
    from advguard.ensemble import open_model
    from advguard.models import model_card
    from advguard.models import predict as classify

    model, meta, _ = open_model(checkpoint, model_options, DataOptions(data=data),
                                need_data=False)
    card = model_card(meta, checkpoint or "the model", trust_builder=True)  # opened above
    x = images_from_array(read_npy(images), channels=card.channels, size=card.size)
    for i, c in enumerate(classify(model, x).tolist()):
        typer.echo(f"{i}\t{c}")
