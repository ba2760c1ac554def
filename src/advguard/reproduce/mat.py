"""The MAT experiment end to end (paper 000, SPEC Part A): train the four methods, evaluate
their robustness curves under transfer FGSM, white-box FGSM and white-box PGD, write the report.

The run directory is the unit of resumption: ``config.json`` fixes the experiment, every stage
(crafting model, FGSM direction datasets, each method's model, each evaluation) is stored under
``checkpoints/`` as soon as it finishes, and training saves its state every epoch. Running the
same command again continues where it stopped.
"""

from __future__ import annotations

import functools
import logging
import statistics
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard.attacks import PGD, check_strengths, fgsm_directions, perturb
from advguard.data import ImageSet, dataset_info, load_dataset, train_val_split
from advguard.ensemble import (
    VotingEnsemble,
    VotingRule,
    fit_voting,
    load_ensemble,
    parse_rule,
    save_ensemble,
    train_parallel,
)
from advguard.errors import AdvguardError, parse_choice
from advguard.evaluation import (
    ThreatSetting,
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
    strength_grid,
)
from advguard.io import load_tensors, read_json, read_metadata, save_tensors, write_json
from advguard.models import build_model, load_model, model_for, save_model
from advguard.reports import MatResults, MethodResult, write_report
from advguard.reproduce.rundir import prepare_run_dir
from advguard.strengths import (
    Combination,
    agreement_rate,
    estimate_H,
    exhaustive_select,
    mssim_table,
    random_walk_select,
    strength_bound,
)
from advguard.training import (
    RECIPES,
    Recipe,
    StrengthMix,
    TrainConfig,
    TransferDirections,
    accuracy,
    get_recipe,
    train,
)

log = logging.getLogger(__name__)


class Setting(str, Enum):
    """How adversarial training data is crafted (SPEC A2)."""

    TRANSFER = "transfer"  # fixed datasets crafted on a separate crafting model
    WHITE_BOX = "white-box"  # online, on the model being trained, every batch


class MatrixAttack(str, Enum):
    """The attack filling the accuracy matrix on the validation split."""

    FGSM = "fgsm"  # the setting's FGSM (the paper's; the only one in the transfer setting)
    PGD = "pgd"  # white-box PGD: robustness FGSM cannot fake by masking its gradient


# The recipe each setting runs by default (see advguard.training.recipes).
DEFAULT_RECIPES = {Setting.TRANSFER.value: "fgsm", Setting.WHITE_BOX.value: "fgsm-rs"}


# Per dataset: the paper's grid of strengths (pixel units), for testing and as candidates.
_MNIST_GRID = strength_grid(0.3, 0.03)
_RGB_GRID = strength_grid(5 / 255, 0.5 / 255)
DEFAULT_GRIDS: dict[str, list[float]] = {
    "mnist": _MNIST_GRID, "fashion-mnist": _MNIST_GRID, "cifar10": _RGB_GRID,
    "cifar100": _RGB_GRID, "svhn": _RGB_GRID}


@dataclass
class MatConfig:
    dataset: str = "mnist"
    setting: str = Setting.TRANSFER.value  # "transfer" (the paper's) or "white-box"
    strengths: list[float] | None = None  # MAT strengths, hand-picked; None: random-walk selection
    single_strength: float | None = None  # None: best single row of the accuracy matrix
    tau: float = 0.5  # MSSIM threshold bounding the candidate strengths (SPEC A4)
    matrix_epochs: int = 3  # epochs of each single-strength model of the accuracy matrix
    matrix_train_limit: int | None = None  # train the matrix models on the first N images only
    matrix_attack: str | None = None  # fgsm or pgd; None: fgsm (transfer), pgd (white-box)
    matrix_pgd_steps: int = 10  # PGD steps of a PGD accuracy matrix (step 2.5·ε/steps)
    matrix_val_limit: int | None = None  # matrix on the first N validation images (None: all
    #                                       for FGSM, 1,000 for PGD)
    recipe: str | None = None  # training recipe; None: fgsm (transfer), fgsm-rs (white-box)
    pgd_at: bool = False  # also train the PGD-AT baseline (white-box setting)
    walks: int = 1000  # random walks (t); with l = 8 they find the exact optimum of the tests
    walk_steps: int = 8  # steps per walk (l)
    penalty: float = -0.001  # a: G = H + a·S (0.1 point of accuracy per extra strength)
    voting: str = VotingRule.MEAN.value  # parallel MAT's voting rule: mean, learned, gated
    compare_voting: bool = False  # also fit and evaluate every other voting rule
    voting_epochs: int = 30  # epochs fitting the voting unit on validation data
    workers: int = 1  # processes training parallel-MAT members concurrently
    grid: list[float] | None = None  # test strengths; None: the dataset's default grid
    mixed_size: str = "full"  # mixed MAT: "full" (S+1 times the data) or "reduced" (N_C total)
    epochs: int = 10  # victim training epochs (passes over the clean training set)
    crafter_epochs: int = 8  # crafting model training epochs (LeNet-5 reaches ~99% on MNIST)
    batch_size: int | None = None  # clean examples per step (None: the recipe's)
    lr: float | None = None  # Adam, the peak of a one-cycle schedule (None: the recipe's)
    val_size: int = 5000  # held out of the training file for validation (never test data)
    train_limit: int | None = None  # use only the first N training images (quick runs)
    test_limit: int | None = None  # use only the first N test images (quick runs)
    pgd_steps: int = 20  # white-box PGD evaluation: steps (step size 2.5·ε/steps)
    pgd_restarts: int = 1  # white-box PGD evaluation: random restarts
    pgd_step_size: float | None = None  # white-box PGD evaluation: step (None: 2.5·ε/steps)
    pgd_limit: int | None = None  # PGD on the first N test images only (None: all)
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None  # None: MNIST from the package, others from $ADVGUARD_DATA_DIR
    download: bool = False
    victim: str | None = None  # architecture; None: the paper's victim for the dataset
    crafter: str | None = None  # architecture; None: the paper's crafting model

    def resolved(self) -> MatConfig:
        """A copy with every default filled in and every value checked."""
        info = dataset_info(self.dataset)
        setting = parse_choice(Setting, self.setting, "setting").value
        if self.mixed_size not in ("full", "reduced"):
            raise AdvguardError(f"mixed_size must be 'full' or 'reduced', got {self.mixed_size!r}")
        strengths = check_strengths(self.strengths) if self.strengths else None
        grid = check_strengths(self.grid or DEFAULT_GRIDS[info.name])
        single = self.single_strength
        if single is None and strengths:
            single = statistics.median_low(strengths)
        if single is not None:
            check_strengths(single)
        if self.penalty > 0:
            raise AdvguardError(f"penalty must be ≤ 0, got {self.penalty}")
        voting = parse_rule(self.voting).value
        recipe = get_recipe(self.recipe or DEFAULT_RECIPES[setting]).name
        matrix_attack = parse_choice(
            MatrixAttack, self.matrix_attack or ("fgsm" if setting == "transfer" else "pgd"),
            "matrix attack").value
        if setting == Setting.TRANSFER.value and (recipe != "fgsm" or matrix_attack != "fgsm"
                                                  or self.pgd_at):
            raise AdvguardError("the transfer setting trains and selects with the crafting "
                                "model's FGSM only: recipe 'fgsm', matrix attack 'fgsm', no "
                                "PGD-AT (use --setting white-box)")
        matrix_val_limit = self.matrix_val_limit
        if matrix_val_limit is None and matrix_attack == "pgd":
            matrix_val_limit = 1000
        if self.pgd_step_size is not None and not 0 < self.pgd_step_size <= 1:
            raise AdvguardError(f"pgd_step_size must be in (0, 1], got {self.pgd_step_size}")
        for name in ("epochs", "crafter_epochs", "batch_size", "pgd_steps", "pgd_restarts",
                     "pgd_limit", "matrix_epochs", "matrix_train_limit", "walks", "voting_epochs",
                     "workers", "matrix_pgd_steps", "matrix_val_limit"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise AdvguardError(f"{name} must be at least 1, got {getattr(self, name)}")
        return replace(self, dataset=info.name, setting=setting, strengths=strengths, grid=grid,
                       single_strength=None if single is None else float(single), voting=voting,
                       recipe=recipe, matrix_attack=matrix_attack,
                       lr=self.lr or get_recipe(recipe).lr,
                       batch_size=self.batch_size or get_recipe(recipe).batch_size,
                       matrix_val_limit=matrix_val_limit,
                       victim=self.victim or model_for(info.name, "victim"),
                       crafter=self.crafter or model_for(info.name, "crafter"))


@dataclass
class _Data:
    train: ImageSet
    val: ImageSet
    test: ImageSet


@dataclass
class MatRun:
    """One run directory and the stages stored in it."""

    config: MatConfig
    out: Path
    progress: bool = True
    _data: _Data | None = field(default=None, repr=False)

    @property
    def ckpt(self) -> Path:
        return self.out / "checkpoints"

    @property
    def transfer(self) -> bool:
        return self.config.setting == Setting.TRANSFER.value

    @property
    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size or 128, lr=c.lr or 1e-3,
                           seed=c.seed, device=c.device)

    @property
    def recipe(self) -> Recipe:
        return get_recipe(self.config.recipe or "fgsm")

    def method_config(self, recipe: Recipe, epochs: int | None = None) -> TrainConfig:
        """The training configuration of a victim model trained with ``recipe``."""
        return replace(self.train_config, schedule=recipe.schedule,
                       epochs=epochs or self.config.epochs)

    def trainer(self, recipe: Recipe, strengths: list[float],
                reduced: bool = False) -> tuple[StrengthMix, Any]:
        """The batch mixing and adversarial source of a model trained at ``strengths``."""
        mix = recipe.mix(strengths, reduced=reduced)
        if not strengths:
            return mix, None
        if self.transfer:
            return mix, TransferDirections(self.directions("train"))
        return mix, recipe.source

    @property
    def grid(self) -> list[float]:
        return list(self.config.grid or [])

    def build_victim(self) -> nn.Module:
        return build_model(self.config.victim or "", self.config.dataset)

    def data(self) -> _Data:
        if self._data is None:
            c = self.config
            full = load_dataset(c.dataset, "train", data_dir=c.data_dir, download=c.download,
                                limit=c.train_limit)
            test = load_dataset(c.dataset, "test", data_dir=c.data_dir, download=c.download,
                                limit=c.test_limit)
            val_size = min(c.val_size, len(full) // 5)
            tr, va = train_val_split(len(full), val_size, c.seed)
            self._data = _Data(full.subset(tr), full.subset(va), test)
            log.info("data: %d train, %d validation, %d test", len(tr), len(va), len(test))
        return self._data

    def _split(self, split: str) -> ImageSet:
        d = self.data()
        return {"train": d.train, "val": d.val, "test": d.test}[split]

    # --- stages ---------------------------------------------------------------------------

    def crafter(self) -> nn.Module:
        """The separately trained crafting model (SPEC A2), trained once and stored."""
        path = self.ckpt / "crafter.safetensors"
        if path.exists():
            return load_model(path)[0]
        c, d = self.config, self.data()
        torch.manual_seed(c.seed)
        model = build_model(c.crafter or "", c.dataset)
        paper = RECIPES["fgsm"]  # the crafting model trains the same way in every setting
        result = train(model, d.train, StrengthMix(), None,
                       replace(self.train_config, epochs=c.crafter_epochs, lr=paper.lr,
                               batch_size=paper.batch_size), val=d.val,
                       state_path=self.ckpt / "crafter.state.pt", progress=self.progress,
                       desc=f"crafter {c.crafter}")
        acc = accuracy(model, d.test.x, d.test.y, device=c.device)
        log.info("crafting model %s: clean test accuracy %.4f", c.crafter, acc)
        save_model(path, model, arch=c.crafter or "", dataset=c.dataset, test_accuracy=acc,
                   train_seconds=result.seconds, history=result.history)
        (self.ckpt / "crafter.state.pt").unlink(missing_ok=True)
        return model.eval()

    def directions(self, split: str) -> torch.Tensor:
        """FGSM directions of ``split`` crafted on the crafting model, int8 (cached)."""
        path = self.ckpt / f"directions-{split}.safetensors"
        if path.exists():
            return load_tensors(path)[0]["directions"]
        images = self._split(split)
        dirs = fgsm_directions(self.crafter(), images.x, images.y, device=self.config.device,
                               progress=self.progress, desc=f"craft FGSM ({split})")
        save_tensors(path, {"directions": dirs}, {"crafter": self.config.crafter})
        return dirs

    def attack_directions(self, model: nn.Module, split: str) -> torch.Tensor:
        """The setting's FGSM directions on ``split``: the crafting model's (transfer) or
        ``model``'s own (white-box)."""
        if self.transfer:
            return self.directions(split)
        images = self._split(split)
        return fgsm_directions(model, images.x, images.y, device=self.config.device)

    def mssim(self) -> dict[str, Any]:
        """MSSIM between validation images and their FGSM copies at every grid strength, and
        the bound it gives (SPEC A4)."""
        path = self.ckpt / "mssim.json"
        if path.exists():
            return dict(read_json(path))
        val = self.data().val
        table = mssim_table(val.x, self.directions("val"), self.grid)
        bound = strength_bound(self.grid, table, self.config.tau)
        out = {"grid": self.grid, "mssim": table, "tau": self.config.tau, "bound": bound,
               "images": "validation split, FGSM directions of the crafting model"}
        log.info("MSSIM bound (tau=%.2f): eps <= %.4g", self.config.tau, bound)
        write_json(path, out)
        return out

    def candidates(self) -> list[float]:
        bound = self.mssim()["bound"]
        return [e for e in self.grid if 0 < e <= bound + 1e-12]

    def matrix(self) -> list[list[float]]:
        """A[i][j]: validation accuracy of the single-strength model trained at candidate i
        under candidate strength j, in the run's setting (SPEC A5). One row per cached file."""
        c, d = self.config, self.data()
        cands = self.candidates()
        rows = []
        train_set = d.train if c.matrix_train_limit is None else d.train.subset(
            slice(0, c.matrix_train_limit))
        val = d.val.subset(slice(0, c.matrix_val_limit or len(d.val)))
        key = {"attack": c.matrix_attack, "recipe": self.recipe.name,
               "validation_images": len(val)}
        for i, eps in enumerate(cands):
            path = self.ckpt / f"matrix-{i}.json"
            cached = read_json(path) if path.exists() else None
            if cached is not None and cached["strength"] == eps and all(
                    cached.get(k) == v for k, v in key.items()):
                rows.append(list(cached["accuracy"]))
                continue
            torch.manual_seed(c.seed)
            model = self.build_victim()
            mix, source = self.trainer(self.recipe, [eps])
            train(model, train_set, mix, source, self.method_config(self.recipe, c.matrix_epochs),
                  progress=self.progress, desc=f"matrix row {i + 1}/{len(cands)} eps={eps:g}")
            if c.matrix_attack == MatrixAttack.PGD.value:
                row = pgd_curve(model, val.x, val.y, cands,
                                PGD(steps=c.matrix_pgd_steps, seed=c.seed), device=c.device)
            else:
                dirs = (self.directions("val")[:len(val)] if self.transfer
                        else fgsm_directions(model, val.x, val.y, device=c.device))
                row = curve_from_directions(model, val.x, val.y, dirs, cands, device=c.device)
            write_json(path, {"strength": eps, "test_strengths": cands, "accuracy": row, **key})
            rows.append(row)
        return rows

    def selection(self) -> dict[str, Any]:
        """The strengths of every method: hand-picked, or chosen by random walk over the
        accuracy matrix, with the exact optimum of the same G beside it."""
        c = self.config
        if c.strengths:
            return {"source": "hand-picked", "single": [c.single_strength],
                    "mixed": list(c.strengths), "parallel": list(c.strengths)}
        path = self.ckpt / "selection.json"
        if path.exists():
            return dict(read_json(path))
        cands, A = self.candidates(), self.matrix()
        out: dict[str, Any] = {"source": "random walk", "candidates": cands, "matrix": A,
                               "matrix_attack": self.matrix_description(),
                               "walks": c.walks, "steps": c.walk_steps, "penalty": c.penalty,
                               "seed": c.seed, "mssim": self.mssim()}
        for combo in (Combination.PARALLEL, Combination.MIXED):
            walk = random_walk_select(A, walks=c.walks, steps=c.walk_steps, penalty=c.penalty,
                                      combination=combo, seed=c.seed)
            exact = exhaustive_select(A, penalty=c.penalty, combination=combo)
            rate = agreement_rate(A, range(100), walks=c.walks, steps=c.walk_steps,
                                  penalty=c.penalty, combination=combo)
            out[combo.value] = [cands[i] for i in walk.subset]
            out[f"{combo.value}_selection"] = {
                "walk": {"strengths": [cands[i] for i in walk.subset], "G": walk.G, "H": walk.H},
                "exact": {"strengths": [cands[i] for i in exact.subset], "G": exact.G,
                          "H": exact.H},
                "agree": walk.subset == exact.subset, "agreement_over_100_seeds": rate}
            log.info("%s MAT strengths by random walk: %s (G=%.4f; exact optimum %s, G=%.4f)",
                     combo.value, out[combo.value], walk.G,
                     out[f"{combo.value}_selection"]["exact"]["strengths"], exact.G)
        if c.single_strength is not None:
            out["single"] = [c.single_strength]
        else:
            matrix = np.asarray(A)
            best = max(range(len(cands)), key=lambda i: estimate_H(matrix, [i]))
            out["single"] = [cands[best]]
        write_json(path, out)
        return out

    def matrix_description(self) -> str:
        c = self.config
        where = f"first {c.matrix_val_limit} validation images" if c.matrix_val_limit else \
            "validation split"
        if c.matrix_attack == MatrixAttack.PGD.value:
            return (f"white-box PGD-{c.matrix_pgd_steps} (step 2.5·ε/{c.matrix_pgd_steps}, "
                    f"random start), {where}")
        return f"{'transfer' if self.transfer else 'white-box'} FGSM, {where}"

    def method_strengths(self, method: str) -> list[float]:
        if method == "original":
            return []
        if method == "pgd-at":  # Madry et al. train at the top of the range
            return [max(self.grid)]
        return list(self.selection()[method])

    def voting_data(self, ensemble: VotingEnsemble) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation images, clean and FGSM at every grid strength, to fit the voting unit:
        the crafting model's FGSM (transfer) or the mean-vote ensemble's own (white-box)."""
        val = self.data().val
        dirs = self.attack_directions(ensemble, "val")
        xs = [val.x] + [perturb(val.x, dirs, e) for e in self.grid if e > 0]
        return torch.cat(xs), val.y.repeat(len(xs))

    def ensemble(self, rule: str) -> tuple[VotingEnsemble, float]:
        """Parallel MAT with voting ``rule``; members are trained once and shared by all
        rules."""
        c, d = self.config, self.data()
        members_path = self.ckpt / "parallel-members.safetensors"
        if members_path.exists():
            base, meta = load_ensemble(members_path)
            seconds = float(meta["train_seconds"])
        else:
            strengths = self.method_strengths("parallel")
            mix, source = self.trainer(self.recipe, strengths[:1])
            base, res = train_parallel(
                functools.partial(build_model, c.victim or "", c.dataset), d.train, strengths,
                source, self.method_config(self.recipe), val=d.val, state_dir=self.ckpt,
                progress=self.progress, workers=c.workers, clean=mix.clean)
            seconds = sum(r.seconds for r in res.members)
            save_ensemble(members_path, base, arch=c.victim or "", dataset=c.dataset,
                          strengths=strengths, train_seconds=seconds,
                          history=[r.history for r in res.members],
                          peak_rss_mb=res.peak_rss_mb, workers=c.workers)
            for k in range(len(strengths)):
                (self.ckpt / f"parallel-{k}.state.pt").unlink(missing_ok=True)
        if rule == VotingRule.MEAN.value:
            return base, seconds
        path = self.ckpt / f"parallel-{rule}.safetensors"
        if path.exists():
            return load_ensemble(path)[0], seconds
        ens = VotingEnsemble(list(base.members), rule=rule, num_classes=d.val.info.num_classes)
        x, y = self.voting_data(base)
        losses = fit_voting(ens, x, y, epochs=c.voting_epochs, seed=c.seed, device=c.device)
        save_ensemble(path, ens, arch=c.victim or "", dataset=c.dataset,
                      strengths=self.method_strengths("parallel"), train_seconds=seconds,
                      voting_losses=losses)
        return ens.eval(), seconds

    def model(self, method: str) -> tuple[nn.Module, float]:
        """The trained model of ``method`` and its training wall time (trained if missing)."""
        if method == "parallel":
            return self.ensemble(self.config.voting)
        c, d = self.config, self.data()
        path = self.ckpt / f"{method}.safetensors"
        if path.exists():
            model, meta = load_model(path)
            return model, float(meta["train_seconds"])
        strengths = self.method_strengths(method)
        torch.manual_seed(c.seed)
        model = self.build_victim()
        recipe = RECIPES["pgd-at"] if method == "pgd-at" else self.recipe
        mix, source = self.trainer(recipe, strengths, reduced=method == "mixed" and
                                   c.mixed_size == "reduced")
        state = self.ckpt / f"{method}.state.pt"
        result = train(model, d.train, mix, source, self.method_config(recipe), val=d.val,
                       state_path=state, progress=self.progress, desc=method)
        save_model(path, model, arch=c.victim or "", dataset=c.dataset, strengths=strengths,
                   train_seconds=result.seconds, history=result.history, recipe=recipe.name)
        state.unlink(missing_ok=True)
        return model, result.seconds

    def curves(self, model: nn.Module, name: str, pgd_limit: int | None) -> dict[str, list[float]]:
        """``model``'s curves under the three threat settings on the test set."""
        c, test = self.config, self.data().test
        model.to(c.device)
        kw: dict[str, Any] = {"device": c.device, "progress": self.progress}
        return {
            ThreatSetting.TRANSFER_FGSM.value: curve_from_directions(
                model, test.x, test.y, self.directions("test"), self.grid,
                desc=f"{name} transfer", **kw),
            ThreatSetting.WHITE_BOX_FGSM.value: fgsm_curve(model, test.x, test.y, self.grid, **kw),
            ThreatSetting.WHITE_BOX_PGD.value: pgd_curve(
                model, test.x[:pgd_limit], test.y[:pgd_limit], self.grid,
                PGD(steps=c.pgd_steps, restarts=c.pgd_restarts, step_size=c.pgd_step_size,
                    seed=c.seed),
                desc=f"{name} PGD-{c.pgd_steps}", **kw),
        }

    def evaluate(self, method: str) -> MethodResult:
        """Curves of ``method`` under the three threat settings (cached per method)."""
        path = self.ckpt / f"eval-{method}.json"
        if path.exists():
            return MethodResult(**read_json(path))
        model, seconds = self.model(method)
        curves = self.curves(model, method, self.config.pgd_limit)
        primary = self.primary_attack
        result = MethodResult(curve=curves[primary], mean=grid_mean(curves[primary]),
                              strengths=self.method_strengths(method), curves=curves,
                              means={k: grid_mean(v) for k, v in curves.items()},
                              train_seconds=seconds)
        write_json(path, asdict(result))
        return result

    def voting_comparison(self) -> dict[str, Any]:
        """Every voting rule on the same members: grid means under the three attacks (PGD on
        at most the first 1,000 test images), and the learned weights."""
        path = self.ckpt / "eval-voting.json"
        if path.exists():
            return dict(read_json(path))
        limit = min(self.config.pgd_limit or 1000, 1000)
        out: dict[str, Any] = {"pgd_test_images": min(limit, len(self.data().test))}
        for rule in VotingRule:
            ens, _ = self.ensemble(rule.value)
            curves = self.curves(ens, f"parallel[{rule.value}]", limit)
            out[rule.value] = {"means": {k: grid_mean(v) for k, v in curves.items()},
                               "curves": curves}
            if rule is VotingRule.LEARNED:
                out[rule.value]["weights"] = ens.logits.detach().softmax(0).tolist()
        write_json(path, out)
        return out

    @property
    def primary_attack(self) -> str:
        return (ThreatSetting.TRANSFER_FGSM.value if self.transfer
                else ThreatSetting.WHITE_BOX_FGSM.value)


def run_mat(config: MatConfig, out: str | Path, *, progress: bool = True) -> MatResults:
    """Run (or resume) the MAT experiment in ``out`` and write its report there."""
    cfg = prepare_run_dir(config, out)
    run = MatRun(cfg, Path(out), progress)
    selection = run.selection()
    names = ["original", "single", "mixed", "parallel"] + (["pgd-at"] if cfg.pgd_at else [])
    methods = {m: run.evaluate(m) for m in names}
    voting = run.voting_comparison() if cfg.compare_voting else None
    crafter_meta = read_metadata(run.ckpt / "crafter.safetensors")
    members_meta = read_metadata(run.ckpt / "parallel-members.safetensors")
    d = run.data()
    results = MatResults(
        dataset=cfg.dataset, setting=cfg.setting, attack=run.primary_attack, grid=run.grid,
        methods=methods,
        details={"victim": cfg.victim, "crafter": cfg.crafter,
                 "crafter_test_accuracy": crafter_meta["test_accuracy"],
                 "mixed_size": cfg.mixed_size, "seed": cfg.seed, "voting_rule": cfg.voting,
                 "train_size": len(d.train), "val_size": len(d.val), "test_size": len(d.test),
                 "recipe": {"name": run.recipe.name, "summary": run.recipe.summary,
                            "schedule": run.recipe.schedule, "lr": cfg.lr,
                            "epochs": cfg.epochs, "batch_size": cfg.batch_size},
                 "pgd": {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts,
                         "test_images": min(cfg.pgd_limit or len(d.test), len(d.test)),
                         "step_size": (cfg.pgd_step_size if cfg.pgd_step_size is not None
                                       else "2.5*eps/steps"), "random_start": True},
                 "parallel_training": {"workers": cfg.workers,
                                       "peak_rss_mb": members_meta.get("peak_rss_mb")},
                 "selection": selection, "voting": voting})
    write_report(out, results)
    return results
