"""The MAT experiment end to end (paper 000, SPEC Part A): train the four methods, evaluate
their robustness curves under transfer FGSM, white-box FGSM and white-box PGD, write the report.

The run directory is the unit of resumption: ``config.json`` fixes the experiment, every stage
(crafting model, FGSM direction datasets, each method's model, each evaluation) is stored under
``checkpoints/`` as soon as it finishes, and training saves its state every epoch. Running the
same command again continues where it stopped.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard.attacks import PGD, check_strengths, fgsm_directions
from advguard.data import ImageSet, dataset_info, load_dataset, train_val_split
from advguard.ensemble import load_ensemble, save_ensemble, train_parallel
from advguard.errors import AdvguardError, CheckpointError
from advguard.evaluation import (
    ThreatSetting,
    curve_from_directions,
    grid_mean,
    pgd_curve,
    strength_grid,
)
from advguard.io import load_tensors, read_json, save_tensors, write_json
from advguard.models import build_model, load_model, model_for, save_model
from advguard.reports import MatResults, MethodResult, write_report
from advguard.training import (
    StrengthMix,
    TrainConfig,
    TransferDirections,
    WhiteBoxDirections,
    accuracy,
    train,
)

log = logging.getLogger(__name__)


class Setting(str, Enum):
    """How adversarial training data is crafted (SPEC A2)."""

    TRANSFER = "transfer"  # fixed datasets crafted on a separate crafting model
    WHITE_BOX = "white-box"  # online, on the model being trained, every batch


# Per dataset: the test grid and the default MAT strengths (pixel units).
_MNIST = {"grid": strength_grid(0.3, 0.03), "strengths": [0.1, 0.2, 0.3]}
_RGB = {"grid": strength_grid(5 / 255, 0.5 / 255),
        "strengths": [round(e / 255, 10) for e in (1.0, 3.0, 5.0)]}
DEFAULTS: dict[str, dict[str, list[float]]] = {
    "mnist": _MNIST, "fashion-mnist": _MNIST, "cifar10": _RGB, "cifar100": _RGB, "svhn": _RGB}


@dataclass
class MatConfig:
    dataset: str = "mnist"
    setting: str = Setting.TRANSFER.value  # "transfer" (the paper's) or "white-box"
    strengths: list[float] | None = None  # MAT strengths; None: the dataset's default
    single_strength: float | None = None  # single-strength method; None: median of strengths
    grid: list[float] | None = None  # test strengths; None: the dataset's default grid
    mixed_size: str = "full"  # mixed MAT: "full" (S+1 times the data) or "reduced" (N_C total)
    epochs: int = 10  # victim training epochs (passes over the clean training set)
    crafter_epochs: int = 8  # crafting model training epochs (LeNet-5 reaches ~99% on MNIST)
    batch_size: int = 128  # clean examples per step
    lr: float = 1e-3  # Adam
    val_size: int = 5000  # held out of the training file for validation (never test data)
    train_limit: int | None = None  # use only the first N training images (quick runs)
    test_limit: int | None = None  # use only the first N test images (quick runs)
    pgd_steps: int = 20  # white-box PGD evaluation: steps (step size 2.5·ε/steps)
    pgd_restarts: int = 1  # white-box PGD evaluation: random restarts
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
        try:
            setting = Setting(self.setting).value
        except ValueError:
            raise AdvguardError(f"unknown setting {self.setting!r}; choose 'transfer' or "
                                "'white-box'") from None
        if self.mixed_size not in ("full", "reduced"):
            raise AdvguardError(f"mixed_size must be 'full' or 'reduced', got {self.mixed_size!r}")
        strengths = check_strengths(self.strengths or DEFAULTS[info.name]["strengths"])
        grid = check_strengths(self.grid or DEFAULTS[info.name]["grid"])
        single = (self.single_strength if self.single_strength is not None
                  else statistics.median_low(strengths))
        check_strengths(single)
        for name in ("epochs", "crafter_epochs", "batch_size", "pgd_steps", "pgd_restarts",
                     "pgd_limit"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise AdvguardError(f"{name} must be at least 1, got {getattr(self, name)}")
        return replace(self, dataset=info.name, setting=setting, strengths=strengths, grid=grid,
                       single_strength=float(single),
                       victim=self.victim or model_for(info.name, "victim"),
                       crafter=self.crafter or model_for(info.name, "crafter"))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MatConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in names})


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
    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, seed=c.seed,
                           device=c.device)

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

    # --- stages ---------------------------------------------------------------------------

    def crafter(self) -> nn.Module:
        """The separately trained crafting model (SPEC A2), trained once and stored."""
        path = self.ckpt / "crafter.safetensors"
        if path.exists():
            return load_model(path)[0]
        c, d = self.config, self.data()
        torch.manual_seed(c.seed)
        model = build_model(c.crafter, c.dataset)  # type: ignore[arg-type]
        result = train(model, d.train, StrengthMix(), None,
                       replace(self.train_config, epochs=c.crafter_epochs), val=d.val,
                       state_path=self.ckpt / "crafter.state.pt", progress=self.progress,
                       desc=f"crafter {c.crafter}")
        acc = accuracy(model, d.test.x, d.test.y, device=c.device)
        log.info("crafting model %s: clean test accuracy %.4f", c.crafter, acc)
        save_model(path, model, arch=c.crafter, dataset=c.dataset,  # type: ignore[arg-type]
                   test_accuracy=acc, train_seconds=result.seconds, history=result.history)
        (self.ckpt / "crafter.state.pt").unlink(missing_ok=True)
        return model.eval()

    def directions(self, split: str) -> torch.Tensor:
        """FGSM directions of ``split`` crafted on the crafting model, int8 (cached)."""
        path = self.ckpt / f"directions-{split}.safetensors"
        if path.exists():
            return load_tensors(path)[0]["directions"]
        d = self.data()
        images = d.train if split == "train" else d.test
        crafter = self.crafter()
        dirs = fgsm_directions(crafter, images.x, images.y, device=self.config.device,
                               progress=self.progress, desc=f"craft FGSM ({split})")
        save_tensors(path, {"directions": dirs}, {"crafter": self.config.crafter})
        return dirs

    def method_strengths(self, method: str) -> list[float]:
        c = self.config
        table: dict[str, list[float]] = {
            "original": [], "single": [float(c.single_strength or 0.0)],
            "mixed": list(c.strengths or []), "parallel": list(c.strengths or [])}
        return table[method]

    def model(self, method: str) -> tuple[nn.Module, float]:
        """The trained model of ``method`` and its training wall time (trained if missing)."""
        c, d = self.config, self.data()
        path = self.ckpt / f"{method}.safetensors"
        if path.exists():
            if method == "parallel":
                ens, meta = load_ensemble(path)
                return ens, float(meta["train_seconds"])
            model, meta = load_model(path)
            return model, float(meta["train_seconds"])
        transfer = c.setting == Setting.TRANSFER.value

        def source() -> TransferDirections | WhiteBoxDirections:
            return (TransferDirections(self.directions("train")) if transfer
                    else WhiteBoxDirections())

        strengths = self.method_strengths(method)
        if method == "parallel":
            ens, results = train_parallel(
                lambda: build_model(c.victim, c.dataset),  # type: ignore[arg-type]
                d.train, strengths, source, self.train_config, val=d.val, state_dir=self.ckpt,
                progress=self.progress)
            seconds = sum(r.seconds for r in results)
            save_ensemble(path, ens, arch=c.victim, dataset=c.dataset,  # type: ignore[arg-type]
                          strengths=strengths, train_seconds=seconds,
                          history=[r.history for r in results])
            for k in range(len(strengths)):
                (self.ckpt / f"parallel-{k}.state.pt").unlink(missing_ok=True)
            return ens, seconds
        torch.manual_seed(c.seed)
        model = build_model(c.victim, c.dataset)  # type: ignore[arg-type]
        mix = StrengthMix(tuple(strengths), reduced=method == "mixed" and
                          c.mixed_size == "reduced")
        state = self.ckpt / f"{method}.state.pt"
        result = train(model, d.train, mix, source() if strengths else None, self.train_config,
                       val=d.val, state_path=state, progress=self.progress, desc=method)
        save_model(path, model, arch=c.victim, dataset=c.dataset,  # type: ignore[arg-type]
                   strengths=strengths, train_seconds=result.seconds, history=result.history)
        state.unlink(missing_ok=True)
        return model, result.seconds

    def evaluate(self, method: str) -> MethodResult:
        """Curves of ``method`` under the three threat settings (cached per method)."""
        path = self.ckpt / f"eval-{method}.json"
        if path.exists():
            return MethodResult(**read_json(path))
        c, d = self.config, self.data()
        model, seconds = self.model(method)
        model.to(c.device)
        grid = list(c.grid or [])
        test = d.test
        kw: dict[str, Any] = {"device": c.device, "progress": self.progress}
        curves = {
            ThreatSetting.TRANSFER_FGSM.value: curve_from_directions(
                model, test.x, test.y, self.directions("test"), grid, desc=f"{method} transfer",
                **kw),
            ThreatSetting.WHITE_BOX_FGSM.value: curve_from_directions(
                model, test.x, test.y, fgsm_directions(model, test.x, test.y, **kw), grid,
                desc=f"{method} white-box FGSM", **kw),
            ThreatSetting.WHITE_BOX_PGD.value: pgd_curve(
                model, test.x[:c.pgd_limit], test.y[:c.pgd_limit], grid,
                PGD(steps=c.pgd_steps, restarts=c.pgd_restarts, seed=c.seed),
                desc=f"{method} PGD-{c.pgd_steps}", **kw),
        }
        primary = self.primary_attack
        result = MethodResult(curve=curves[primary], mean=grid_mean(curves[primary]),
                              strengths=self.method_strengths(method), curves=curves,
                              means={k: grid_mean(v) for k, v in curves.items()},
                              train_seconds=seconds)
        write_json(path, asdict(result))
        return result

    @property
    def primary_attack(self) -> str:
        return (ThreatSetting.TRANSFER_FGSM.value if self.config.setting == Setting.TRANSFER.value
                else ThreatSetting.WHITE_BOX_FGSM.value)


def prepare_run_dir(config: MatConfig, out: str | Path) -> MatConfig:
    """Resolve ``config`` and fix it in ``out/config.json``; a different stored config is an
    error, so a resumed run never mixes two experiments."""
    cfg = config.resolved()
    out = Path(out)
    stored = out / "config.json"
    if stored.exists():
        old = read_json(stored)
        diff = sorted(k for k, v in asdict(cfg).items() if old.get(k) != v)
        if diff:
            raise CheckpointError(
                f"{out} holds a run with a different configuration ({', '.join(diff)}); "
                "use another --out, or the same options to resume it")
    write_json(stored, asdict(cfg))
    return cfg


def run_mat(config: MatConfig, out: str | Path, *, progress: bool = True) -> MatResults:
    """Run (or resume) the MAT experiment in ``out`` and write its report there."""
    cfg = prepare_run_dir(config, out)
    run = MatRun(cfg, Path(out), progress)
    methods = {m: run.evaluate(m) for m in ("original", "single", "mixed", "parallel")}
    crafter_meta = load_tensors(run.ckpt / "crafter.safetensors")[1]
    results = MatResults(
        dataset=cfg.dataset, setting=cfg.setting, attack=run.primary_attack,
        grid=list(cfg.grid or []), methods=methods,
        details={"victim": cfg.victim, "crafter": cfg.crafter,
                 "crafter_test_accuracy": crafter_meta["test_accuracy"],
                 "mixed_size": cfg.mixed_size, "seed": cfg.seed,
                 "train_size": len(run.data().train), "val_size": len(run.data().val),
                 "test_size": len(run.data().test),
                 "pgd": {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts,
                         "test_images": min(cfg.pgd_limit or len(run.data().test),
                                            len(run.data().test)),
                         "step_size": "2.5*eps/steps", "random_start": True}})
    write_report(out, results)
    return results
