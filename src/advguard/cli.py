"""The ``advguard`` command line: parse, build a config, call the library, render.

Every user-facing error (bad images, unknown names, missing data, corrupt checkpoints) is printed
as one ``error: …`` line with exit status 2.
"""

from __future__ import annotations

import logging
import sys
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import typer

from advguard.errors import AdvguardError, InputError, parse_choice

app = typer.Typer(help="Harden image classifiers against adversarial examples.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
reproduce_app = typer.Typer(help="Reproduce a paper's experiment end to end.",
                            no_args_is_help=True)
app.add_typer(reproduce_app, name="reproduce")

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or logs.")]
DataDir = Annotated[str | None, typer.Option(help="Folder holding the dataset (MNIST: optional, "
                                                  "a copy ships with advguard).")]


def parse_strengths(text: str | None) -> list[float] | None:
    """``"0.1,0.2"`` or ``"1/255,3/255"`` -> floats; ``None`` stays ``None``."""
    if text is None:
        return None
    try:
        return [float(Fraction(t.strip())) for t in text.split(",") if t.strip()]
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot read strengths {text!r}: give comma-separated numbers such as "
                         "0.1,0.2,0.3 or 1/255,3/255") from None


def _setup_logging(quiet: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, console=Console(stderr=True))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


@reproduce_app.command("mat")
def reproduce_mat(
    dataset: Annotated[str, typer.Option(help="mnist, fashion-mnist, cifar10, cifar100, svhn")]
    = "mnist",
    setting: Annotated[str, typer.Option(help="transfer (the paper's) or white-box")]
    = "transfer",
    strengths: Annotated[str | None, typer.Option(
        help="hand-picked MAT strengths, e.g. 0.1,0.2,0.3 (default: random-walk selection)")]
    = None,
    single_strength: Annotated[str | None, typer.Option(
        help="single-strength ε, e.g. 0.3 or 8/255 (default: the best row of the accuracy "
             "matrix)")] = None,
    tau: Annotated[float, typer.Option(help="MSSIM threshold bounding the strengths")] = 0.5,
    matrix_epochs: int = 3,
    matrix_train_limit: Annotated[int | None, typer.Option(
        help="train accuracy-matrix models on the first N images only")] = None,
    matrix_attack: Annotated[str | None, typer.Option(
        help="attack filling the accuracy matrix: fgsm or pgd (default: fgsm in the transfer "
             "setting, pgd in the white-box setting)")] = None,
    matrix_pgd_steps: int = 10,
    matrix_val_limit: Annotated[int | None, typer.Option(
        help="accuracy matrix on the first N validation images (default: all for FGSM, "
             "1000 for PGD)")] = None,
    recipe: Annotated[str | None, typer.Option(
        help="training recipe: fgsm (the paper's), fgsm-rs (random-start FGSM, sampled "
             "strengths, one-cycle lr) or pgd-at; default: fgsm (transfer), fgsm-rs "
             "(white-box)")] = None,
    pgd_at: Annotated[bool, typer.Option(
        help="also train the PGD-40 adversarial training baseline (white-box setting)")]
    = False,
    victim: Annotated[str | None, typer.Option(
        help="victim architecture (default: the paper's for the dataset), e.g. small-cnn")]
    = None,
    walks: int = 1000,
    walk_steps: int = 8,
    penalty: Annotated[float, typer.Option(help="a ≤ 0 in G = H + a·S")] = -0.001,
    voting: Annotated[str, typer.Option(help="parallel MAT voting: mean, learned, gated")]
    = "mean",
    compare_voting: Annotated[bool, typer.Option(
        help="also fit and evaluate every voting rule on the same members")] = False,
    voting_epochs: int = 30,
    workers: Annotated[int, typer.Option(help="processes training parallel members")] = 1,
    grid: Annotated[str | None, typer.Option(help="test strengths (default: the paper's grid)")]
    = None,
    mixed_size: Annotated[str, typer.Option(help="full or reduced")] = "full",
    epochs: int = 10,
    crafter_epochs: int = 8,
    batch_size: Annotated[int | None, typer.Option(help="default: the recipe's")] = None,
    lr: Annotated[float | None, typer.Option(help="default: the recipe's")] = None,
    val_size: int = 5000,
    train_limit: Annotated[int | None, typer.Option(help="first N training images only")] = None,
    test_limit: Annotated[int | None, typer.Option(help="first N test images only")] = None,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    pgd_step_size: Annotated[float | None, typer.Option(
        help="PGD evaluation step in pixel units (default: 2.5·ε/steps)")] = None,
    pgd_limit: Annotated[int, typer.Option(help="PGD on the first N test images (0: all)")]
    = 0,
    seed: int = 0,
    device: str = "cpu",
    data_dir: DataDir = None,
    download: bool = False,
    out: Annotated[Path | None, typer.Option(help="run directory (resumes if it exists)")]
    = None,
    quiet: Quiet = False,
) -> None:
    """Multi-strength adversarial training (MAT): original, single, mixed and parallel MAT,
    their robustness curves and the paper's Table 1."""
    from advguard.reproduce import MatConfig, run_mat

    _setup_logging(quiet)
    config = MatConfig(
        dataset=dataset, setting=setting, strengths=parse_strengths(strengths),
        single_strength=next(iter(parse_strengths(single_strength) or []), None), tau=tau,
        matrix_epochs=matrix_epochs,
        matrix_train_limit=matrix_train_limit, matrix_attack=matrix_attack,
        matrix_pgd_steps=matrix_pgd_steps, matrix_val_limit=matrix_val_limit, recipe=recipe,
        pgd_at=pgd_at, victim=victim, pgd_step_size=pgd_step_size, walks=walks,
        walk_steps=walk_steps,
        penalty=penalty, voting=voting, compare_voting=compare_voting,
        voting_epochs=voting_epochs, workers=workers,
        grid=parse_strengths(grid), mixed_size=mixed_size,
        epochs=epochs, crafter_epochs=crafter_epochs, batch_size=batch_size, lr=lr,
        val_size=val_size, train_limit=train_limit, test_limit=test_limit, pgd_steps=pgd_steps,
        pgd_restarts=pgd_restarts, pgd_limit=pgd_limit or None, seed=seed, device=device,
        data_dir=data_dir,
        download=download)
    out = out or Path("runs") / f"mat-{dataset}-{setting}"
    run_mat(config, out, progress=not quiet)
    typer.echo((out / "table.md").read_text(encoding="utf-8"))
    typer.echo(f"run directory: {out}")


@reproduce_app.command("detect")
def reproduce_detect(
    dataset: Annotated[str, typer.Option(help="mnist or cifar10 (or another dataset)")]
    = "mnist",
    model: Annotated[str | None, typer.Option(help="attacked architecture")] = None,
    epochs: int = 5,
    queries: Annotated[int, typer.Option(help="test images attacked and scored")] = 2000,
    lbfgs_queries: Annotated[int, typer.Option(help="of which attacked with L-BFGS")] = 300,
    k: int = 1000,
    eps: Annotated[str | None, typer.Option(help="FGSM/PGD strength, e.g. 0.2 or 8/255")]
    = None,
    pgd_steps: int = 20,
    keep: float = 0.98,
    mat: Annotated[bool, typer.Option(help="also test the detector on a MAT model")] = True,
    train_limit: int | None = None,
    val_size: int = 5000,
    seed: int = 0,
    device: str = "cpu",
    data_dir: DataDir = None,
    download: bool = False,
    out: Annotated[Path | None, typer.Option(help="run directory")] = None,
    quiet: Quiet = False,
) -> None:
    """kNN deep-feature detection: the paper's Table 2, ROC, threshold sweep, score densities,
    plus an adaptive attacker and a MAT model."""
    from advguard.reproduce.detect import DetectConfig, run_detect

    _setup_logging(quiet)
    eps_value = parse_strengths(eps)
    config = DetectConfig(dataset=dataset, model=model, epochs=epochs, queries=queries,
                          lbfgs_queries=lbfgs_queries, k=k,
                          eps=eps_value[0] if eps_value else None, pgd_steps=pgd_steps,
                          keep=keep, mat=mat, train_limit=train_limit, val_size=val_size,
                          seed=seed, device=device, data_dir=data_dir, download=download)
    out = out or Path("runs") / f"detect-{dataset}"
    run_detect(config, out, progress=not quiet)
    typer.echo((out / "table.md").read_text(encoding="utf-8"))
    typer.echo(f"run directory: {out}")


@app.command()
def train(
    out: Annotated[Path, typer.Argument(help="where to write the model (.safetensors)")],
    dataset: str = "mnist",
    model: Annotated[str | None, typer.Option(help="architecture (default: the paper's victim)")]
    = None,
    strengths: Annotated[str | None, typer.Option(help="FGSM strengths mixed into each batch; "
                                                       "none: clean training")] = None,
    reduced: Annotated[bool, typer.Option(help="mixed MAT, reduced size")] = False,
    crafter: Annotated[Path | None, typer.Option(help="crafting model for the transfer setting "
                                                      "(default: white-box, online)")] = None,
    recipe: Annotated[str, typer.Option(
        help="white-box recipe: fgsm (the paper's), fgsm-rs or pgd-at")] = "fgsm",
    epochs: int = 10,
    batch_size: Annotated[int | None, typer.Option(help="default: the recipe's")] = None,
    lr: Annotated[float | None, typer.Option(help="default: the recipe's")] = None,
    train_limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    data_dir: DataDir = None,
    quiet: Quiet = False,
) -> None:
    """Train one model: clean, single-strength or mixed MAT (transfer or white-box)."""
    import torch

    from advguard.attacks import fgsm_directions
    from advguard.data import load_dataset
    from advguard.models import build_model, load_model, model_for, save_model
    from advguard.training import TrainConfig, TransferDirections, accuracy, get_recipe
    from advguard.training import train as train_model

    _setup_logging(quiet)
    data = load_dataset(dataset, "train", data_dir=data_dir, limit=train_limit)
    arch = model or model_for(dataset, "victim")
    eps = tuple(parse_strengths(strengths) or ())
    how = get_recipe(recipe)
    if crafter is not None and how.name != "fgsm":
        raise AdvguardError("a crafting model (transfer setting) trains with --recipe fgsm only")
    directions: Any = how.source
    if crafter is not None and eps:
        crafting_model, _ = load_model(crafter)
        directions = TransferDirections(fgsm_directions(crafting_model, data.x, data.y,
                                                        device=device, progress=not quiet))
    torch.manual_seed(seed)
    net = build_model(arch, data.info)
    result = train_model(net, data, how.mix(eps, reduced=reduced), directions,
                         TrainConfig(epochs=epochs, batch_size=batch_size or how.batch_size,
                                     lr=lr or how.lr, seed=seed, device=device,
                                     schedule=how.schedule),
                         state_path=out.with_suffix(".state.pt"), progress=not quiet)
    test = load_dataset(dataset, "test", data_dir=data_dir)
    acc = accuracy(net, test.x, test.y, device=device)
    save_model(out, net, arch=arch, dataset=data.info.name, strengths=list(eps),
               train_seconds=result.seconds, history=result.history, test_accuracy=acc,
               recipe=how.name)
    out.with_suffix(".state.pt").unlink(missing_ok=True)
    typer.echo(f"{out}: clean test accuracy {acc:.4f}, {result.seconds:.1f} s")


@app.command()
def audit(
    checkpoint: Annotated[Path, typer.Argument(help="model or ensemble (.safetensors)")],
    eps: Annotated[float, typer.Option(help="L∞ strength to audit at (pixel units)")] = 0.3,
    pgd_steps: int = 40,
    pgd_step_size: Annotated[float | None, typer.Option(
        help="PGD step (default: 2.5·ε/steps)")] = 0.01,
    pgd_restarts: int = 5,
    transfer_from: Annotated[list[Path] | None, typer.Option(
        help="other models whose PGD examples are transferred (black-box check); repeatable")]
    = None,
    test_limit: Annotated[int | None, typer.Option(help="first N test images")] = 1000,
    seed: int = 0,
    device: str = "cpu",
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="write the report as JSON here")] = None,
    quiet: Quiet = False,
) -> None:
    """Audit a white-box robustness claim: advguard's PGD, torchattacks' PGD and APGD (CE, DLR),
    a PGD step sweep, black-box transfer, zero gradients and an unbounded attack."""
    from advguard.attacks import PGD
    from advguard.data import load_dataset
    from advguard.evaluation import audit as run_audit
    from advguard.io import write_json

    _setup_logging(quiet)
    model, meta = _load_any(checkpoint)
    test = load_dataset(meta["dataset"], "test", data_dir=data_dir, limit=test_limit)
    sources = {p.name: _load_any(p)[0] for p in transfer_from or []}
    report = run_audit(model, test.x, test.y, eps,
                       pgd=PGD(steps=pgd_steps, step_size=pgd_step_size, restarts=pgd_restarts,
                               seed=seed),
                       sources=sources, device=device, seed=seed, progress=not quiet)
    typer.echo(f"{checkpoint.name}: ε = {eps:g}, {report.images} test images")
    typer.echo(f"  clean accuracy                 {100 * report.clean_accuracy:6.2f}%")
    for name, acc in report.attacks.items():
        typer.echo(f"  {name:<30} {100 * acc:6.2f}%")
    typer.echo(f"  worst case over all attacks    {100 * report.worst_case_accuracy:6.2f}%")
    for name, acc in report.transfer.items():
        typer.echo(f"  transfer from {name:<16} {100 * acc:6.2f}%")
    typer.echo(f"  zero-gradient inputs           {100 * report.zero_gradient_fraction:6.2f}%")
    typer.echo(f"  unbounded PGD (ε = 1)          {100 * report.unbounded_accuracy:6.2f}%")
    typer.echo("  warnings: " + ("; ".join(report.warnings) or "none"))
    if out is not None:
        write_json(out, {"checkpoint": str(checkpoint), **report.to_json()})


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="model or ensemble (.safetensors)")],
    attack: Annotated[str, typer.Option(help="white-box-fgsm, white-box-pgd or transfer-fgsm")]
    = "white-box-fgsm",
    crafter: Annotated[Path | None, typer.Option(help="crafting model (transfer-fgsm)")] = None,
    grid: Annotated[str | None, typer.Option(help="test strengths (default: the paper's)")]
    = None,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    test_limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="write the curve as JSON here")] = None,
    quiet: Quiet = False,
) -> None:
    """Accuracy vs. strength of a saved model under one attack."""
    from advguard.attacks import PGD
    from advguard.data import load_dataset
    from advguard.evaluation import ThreatSetting, fgsm_curve, grid_mean, pgd_curve
    from advguard.io import write_json
    from advguard.reproduce import DEFAULT_GRIDS

    _setup_logging(quiet)
    model, meta = _load_any(checkpoint)
    threat = parse_choice(ThreatSetting, attack, "attack")
    test = load_dataset(meta["dataset"], "test", data_dir=data_dir, limit=test_limit)
    strengths = parse_strengths(grid) or DEFAULT_GRIDS[test.info.name]
    kw: dict[str, Any] = {"device": device, "progress": not quiet}
    if threat is ThreatSetting.WHITE_BOX_PGD:
        curve = pgd_curve(model, test.x, test.y, strengths,
                          PGD(steps=pgd_steps, restarts=pgd_restarts, seed=seed), **kw)
    else:
        crafting = None
        if threat is ThreatSetting.TRANSFER_FGSM:
            if crafter is None:
                raise InputError("transfer-fgsm needs --crafter CHECKPOINT (the crafting model)")
            crafting = _load_any(crafter)[0]
        curve = fgsm_curve(model, test.x, test.y, strengths, crafter=crafting, **kw)
    result = {"checkpoint": str(checkpoint), "dataset": test.info.name, "attack": threat.value,
              "grid": strengths, "curve": curve, "mean": grid_mean(curve)}
    if out is not None:
        write_json(out, result)
    for eps, acc in zip(strengths, curve, strict=True):
        typer.echo(f"eps={eps:.4g}\taccuracy={acc:.4f}")
    typer.echo(f"grid mean ({threat.value}): {result['mean']:.4f}")


@app.command("select-strengths")
def select_strengths(
    source: Annotated[Path, typer.Argument(
        help="a run directory, or a JSON file {\"strengths\": [...], \"matrix\": [[...]]}")],
    walks: int = 1000,
    walk_steps: int = 8,
    penalty: float = -0.001,
    combination: Annotated[str, typer.Option(help="parallel or mixed")] = "parallel",
    seed: int = 0,
    seeds: Annotated[int, typer.Option(help="seeds to measure agreement over")] = 100,
) -> None:
    """Random-walk strength selection on an accuracy matrix, checked against the exact
    optimum of the same G (paper §4.3)."""
    from advguard.io import read_json
    from advguard.strengths import (
        Combination,
        agreement_rate,
        exhaustive_select,
        random_walk_select,
    )

    combo = parse_choice(Combination, combination, "combination")
    obj = read_json(source / "checkpoints" / "selection.json" if source.is_dir() else source)
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
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="model or ensemble (.safetensors)")],
    images: Annotated[Path, typer.Argument(help=".npy array (N, C, H, W) float in [0, 1]")],
) -> None:
    """Classify images stored as a NumPy array."""
    import numpy as np
    import torch

    from advguard.data import check_images

    model, meta = _load_any(checkpoint)
    if not images.is_file():
        raise InputError(f"image file not found: {images}")
    try:
        array = np.load(images, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot read {images} as a .npy array: {exc}") from None
    x = torch.from_numpy(np.array(array))
    from advguard.data import dataset_info

    info = dataset_info(meta["dataset"])
    check_images(x, channels=info.channels, size=info.size)
    with torch.no_grad():
        pred = model(x.float()).argmax(1)
    for i, c in enumerate(pred.tolist()):
        typer.echo(f"{i}\t{c}")


def _load_any(path: Path) -> tuple[Any, dict[str, Any]]:
    from advguard.ensemble import load_ensemble
    from advguard.io import read_metadata
    from advguard.models import load_model

    return load_ensemble(path) if "members" in read_metadata(path) else load_model(path)


def main() -> None:
    """Console entry point: run the app, turning advguard errors into one line."""
    try:
        app()
    except AdvguardError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished stages are saved; run the same command to resume",
                   err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
