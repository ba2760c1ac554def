"""The MAT experiment's first stages (SPEC A2, A4, A5): data, the crafting model and its FGSM
directions, the MSSIM bound, the accuracy matrix and the strength selection. Each stage is a
function of what it needs, cached in the run directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard import distributed
from advguard.attacks import PGD, fgsm_directions, perturb
from advguard.data import ImageSet, load_dataset, train_val_split
from advguard.evaluation import curve_from_directions, pgd_curve
from advguard.models import accuracy, build_model
from advguard.reproduce.mat.config import MatrixAttack, ResolvedMatConfig
from advguard.reproduce.rundir import RunDir
from advguard.strengths import (
    HAND_PICKED,
    RANDOM_WALK,
    Choice,
    MethodSelection,
    MssimBound,
    StrengthSelection,
    agreement_rate,
    estimate_H,
    exhaustive_select,
    mssim_table,
    random_walk_select,
    strength_bound,
)
from advguard.training import (
    MULTI_STRENGTH,
    RECIPES,
    AdversarialSource,
    Method,
    RecipeName,
    StrengthMix,
    TrainConfig,
    Transfer,
    WhiteBox,
    get_recipe,
    train,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Data:
    train: ImageSet
    val: ImageSet
    test: ImageSet

    def split(self, name: str) -> ImageSet:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


@dataclass(frozen=True)
class Mat:
    """What every stage reads: the resolved config, the run directory, the data."""

    cfg: ResolvedMatConfig
    run: RunDir
    data: Data
    progress: bool = True


def load_data(cfg: ResolvedMatConfig) -> Data:
    full = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download,
                        limit=cfg.train_limit)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download,
                        limit=cfg.test_limit)
    tr, va = train_val_split(len(full), min(cfg.val_size, len(full) // 5), cfg.seed)
    log.info("data: %d train, %d validation, %d test", len(tr), len(va), len(test))
    return Data(full.subset(tr), full.subset(va), test)


def train_config(cfg: ResolvedMatConfig, recipe: RecipeName, epochs: int | None = None,
                 ) -> TrainConfig:
    """The training configuration of a victim model trained with ``recipe``."""
    return get_recipe(recipe).config(epochs=epochs or cfg.epochs, batch_size=cfg.batch_size,
                                     lr=cfg.lr, seed=cfg.seed, device=cfg.device,
                                     schedule=cfg.schedule, augment=cfg.augment,
                                     label_smoothing=cfg.label_smoothing,
                                     channels_last=cfg.channels_last)


def crafter(m: Mat) -> nn.Module:
    """The separately trained crafting model (SPEC A2), trained once and stored."""
    c, d = m.cfg, m.data
    paper = RECIPES[RecipeName.FGSM]  # the crafting model trains the same way in every setting

    def compute() -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(c.seed)
        model = build_model(c.crafter, c.dataset)
        result = train(model, d.train, StrengthMix(), None,
                       TrainConfig(epochs=c.crafter_epochs, batch_size=paper.batch_size,
                                   lr=paper.lr, seed=c.seed, device=c.device),
                       val=d.val, state_path=m.run.path("crafter.state.pt"),
                       progress=m.progress, desc=f"crafter {c.crafter}")
        acc = accuracy(model, d.test.x, d.test.y, device=c.device)
        log.info("crafting model %s: clean test accuracy %.4f", c.crafter, acc)
        return model, {"arch": c.crafter, "dataset": c.dataset, "test_accuracy": acc,
                       "train_seconds": result.seconds, "history": result.history}

    return m.run.model("crafter", compute, cleanup=["crafter.state.pt"])[0]


def directions(m: Mat, split: str) -> torch.Tensor:
    """FGSM directions of ``split`` crafted on the crafting model, int8, cached in the run
    directory and read memory-mapped."""
    def compute() -> torch.Tensor:
        images = m.data.split(split)
        return fgsm_directions(crafter(m), images.x, images.y, device=m.cfg.device,
                               progress=m.progress, desc=f"craft FGSM ({split})")
    return m.run.array(f"directions-{split}", compute)


def attack_directions(m: Mat, model: nn.Module, split: str) -> torch.Tensor:
    """The setting's FGSM directions on ``split``: the crafting model's (transfer) or
    ``model``'s own (white-box)."""
    if m.cfg.transfer:
        return directions(m, split)
    images = m.data.split(split)
    return fgsm_directions(model, images.x, images.y, device=m.cfg.device)


def source(m: Mat, recipe: RecipeName) -> AdversarialSource:
    """Where a victim's adversarial copies come from in the run's setting."""
    if m.cfg.transfer:
        return Transfer(directions(m, "train"))
    return WhiteBox(get_recipe(recipe).attack)


def mssim_bound(m: Mat) -> MssimBound:
    """MSSIM between validation images and their FGSM copies at every grid strength, and the
    bound it gives (SPEC A4)."""
    def compute() -> dict[str, Any]:
        grid = list(m.cfg.grid)
        table = mssim_table(m.data.val.x, directions(m, "val"), grid)
        bound = strength_bound(grid, table, m.cfg.tau)
        log.info("MSSIM bound (tau=%.2f): eps <= %.4g", m.cfg.tau, bound)
        return {"grid": grid, "mssim": table, "tau": m.cfg.tau, "bound": bound,
                "images": "validation split, FGSM directions of the crafting model"}
    return MssimBound(**m.run.json("mssim", compute))


def candidates(m: Mat) -> list[float]:
    bound = mssim_bound(m).bound
    return [e for e in m.cfg.grid if 0 < e <= bound + 1e-12]


def matrix(m: Mat) -> list[list[float]]:
    """A[i][j]: validation accuracy of the single-strength model trained at candidate i under
    candidate strength j, in the run's setting (SPEC A5). One row per cached file."""
    c, d = m.cfg, m.data
    cands = candidates(m)
    train_set = d.train if c.matrix_train_limit is None else d.train.subset(
        slice(0, c.matrix_train_limit))
    val = d.val.subset(slice(0, c.matrix_val_limit or len(d.val)))
    key = {"attack": c.matrix_attack.value, "recipe": c.recipe.value,
           "validation_images": len(val)}

    def row(i: int, eps: float) -> dict[str, Any]:
        torch.manual_seed(c.seed)
        model = build_model(c.victim, c.dataset)
        train(model, train_set, get_recipe(c.recipe).mix([eps]), source(m, c.recipe),
              train_config(c, c.recipe, c.matrix_epochs), progress=m.progress,
              desc=f"matrix row {i + 1}/{len(cands)} eps={eps:g}", distributed=False)
        if c.matrix_attack is MatrixAttack.PGD:
            acc = pgd_curve(model, val.x, val.y, cands, PGD(steps=c.matrix_pgd_steps,
                                                           seed=c.seed), device=c.device)
        else:
            dirs = (directions(m, "val")[:len(val)] if c.transfer
                    else fgsm_directions(model, val.x, val.y, device=c.device))
            acc = curve_from_directions(model, val.x, val.y, dirs, cands, device=c.device)
        return {"strength": eps, "test_strengths": cands, "accuracy": acc, **key}

    def fits(eps: float) -> Any:
        return lambda obj: obj["strength"] == eps and all(obj.get(k) == v for k, v in key.items())

    source(m, c.recipe)  # its stages run on every rank before the rows are spread

    def cached_row(item: tuple[int, float]) -> list[float]:
        i, eps = item
        return list(m.run.json(f"matrix-{i}", lambda: row(i, eps), valid=fits(eps),
                               who="self")["accuracy"])

    # the rows are independent trainings: under torchrun each rank trains every N-th row
    return distributed.spread(list(enumerate(cands)), cached_row)


def matrix_description(cfg: ResolvedMatConfig) -> str:
    where = (f"first {cfg.matrix_val_limit} validation images" if cfg.matrix_val_limit
             else "validation split")
    if cfg.matrix_attack is MatrixAttack.PGD:
        return (f"white-box PGD-{cfg.matrix_pgd_steps} (step 2.5·ε/{cfg.matrix_pgd_steps}, "
                f"random start), {where}")
    return f"{'transfer' if cfg.transfer else 'white-box'} FGSM, {where}"


def selection(m: Mat) -> StrengthSelection:
    """The strengths of every method: hand-picked, or chosen by random walk over the accuracy
    matrix, with the exact optimum of the same G beside it."""
    c = m.cfg
    if c.strengths:
        single = [] if c.single_strength is None else [c.single_strength]
        return StrengthSelection(HAND_PICKED, single, list(c.strengths), list(c.strengths))
    return StrengthSelection.from_json(m.run.json("selection", lambda: _select(m).to_json()))


def _select(m: Mat) -> StrengthSelection:
    c, cands, A = m.cfg, candidates(m), matrix(m)
    walk = c.walk
    chosen: dict[Method, list[float]] = {}
    detail: dict[Method, MethodSelection] = {}
    for combo in MULTI_STRENGTH:
        w = random_walk_select(A, walks=walk.walks, steps=walk.steps, penalty=walk.penalty,
                               combination=combo, seed=walk.seed)
        exact = exhaustive_select(A, penalty=walk.penalty, combination=combo)
        rate = agreement_rate(A, range(100), walks=walk.walks, steps=walk.steps,
                              penalty=walk.penalty, combination=combo)
        chosen[combo] = [cands[i] for i in w.subset]
        detail[combo] = MethodSelection(
            Choice([cands[i] for i in w.subset], w.G, w.H),
            Choice([cands[i] for i in exact.subset], exact.G, exact.H),
            w.subset == exact.subset, rate)
        log.info("%s MAT strengths by random walk: %s (G=%.4f; exact optimum %s, G=%.4f)",
                 combo.value, chosen[combo], w.G, detail[combo].exact.strengths,
                 exact.G)
    if c.single_strength is not None:
        single = [c.single_strength]
    else:
        best = max(range(len(cands)), key=lambda i: estimate_H(np.asarray(A), [i]))
        single = [cands[best]]
    return StrengthSelection(
        RANDOM_WALK, single, chosen[Method.MIXED], chosen[Method.PARALLEL], candidates=cands,
        matrix=A,
        matrix_attack=matrix_description(c), walks=walk.walks, steps=walk.steps,
        penalty=walk.penalty, seed=walk.seed, mssim=mssim_bound(m),
        parallel_selection=detail[Method.PARALLEL], mixed_selection=detail[Method.MIXED])


def voting_data(m: Mat, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation images, clean and FGSM at every grid strength, to fit the voting unit: the
    crafting model's FGSM (transfer) or the mean-vote ensemble's own (white-box)."""
    val = m.data.val
    dirs = attack_directions(m, model, "val")
    xs = [val.x] + [perturb(val.x, dirs, e) for e in m.cfg.grid if e > 0]
    return torch.cat(xs), val.y.repeat(len(xs))
