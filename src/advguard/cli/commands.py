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
