"""The detection experiment's options (every default declared here once) and their resolved
form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from advguard import options as opts
from advguard.attacks import check_strengths
from advguard.data import VAL_SIZE, dataset_info
from advguard.detection import DETECTORS, KNNOptions
from advguard.errors import InputError, parse_choice
from advguard.evaluation.detection import KEEP
from advguard.models import build_model
from advguard.options import option, same_as
from advguard.reproduce import victims
from advguard.training import Schedule, TrainConfig

# the rows of the side-by-side detector table (reproduce/detect/detectors.py builds each):
# every registered detector, and "NAME-fgsm" for one that learns from an attack (fitted on FGSM
# images of the calibration split)
SEEN_ATTACK = "-fgsm"
DETECTOR_ROWS = (*DETECTORS, *(name + SEEN_ATTACK for name, cls in DETECTORS.items()
                               if cls.learns_attacks))


def detector_rows(text: str) -> tuple[str, ...]:
    """``"knn,dknn"`` -> the named rows of the detector table (``none``: no table)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in DETECTOR_ROWS]
    if unknown or not names:
        raise InputError(f"unknown detector {', '.join(unknown) or repr(text)}; choose from: "
                         f"{', '.join(DETECTOR_ROWS)} (comma-separated), or none")
    return names


@dataclass(frozen=True)
class DetectConfig:
    dataset: str = option("mnist", "mnist or cifar10 (or another dataset)")
    model: str | None = option(None, "attacked architecture (default: the dataset's crafting "
                                     "CNN, LeNet-5 / CIFAR)")
    epochs: int = option(5, "training epochs of the attacked model")
    batch_size: int = option(128, "training batch size")
    lr: float = option(1e-3, "Adam learning rate (the peak of a one-cycle schedule)")
    schedule: str | None = victims.schedule_option("constant")
    augment: bool = victims.augment_option()
    label_smoothing: float = victims.label_smoothing_option()
    channels_last: bool = victims.channels_last_option()
    val_size: int = option(VAL_SIZE, "calibration split held out of the training file")
    train_limit: int | None = option(None, "first N training images only")
    queries: int = option(2000, "first N test images are attacked and scored")
    lbfgs_queries: int = option(300, "of which the first N are attacked with L-BFGS")
    k: int = same_as(KNNOptions, "k")
    eps: float | None = option(None, "FGSM/PGD strength, e.g. 0.2 or 8/255 (default: the "
                                     "dataset's, 0.2 on MNIST, 8/255 on colour images)",
                               parse=opts.strength)
    pgd_steps: int = option(20, "PGD and adaptive-attack steps")
    keep: float = option(KEEP, "operating point: share of correctly classified calibration "
                               "images kept")
    adaptive_weight: float = option(1.0, "adaptive attack: weight of the feature-pull term")
    mat: bool = option(True, "also run the detector on a mixed-MAT (white-box) model")
    detectors: tuple[str, ...] = option(
        DETECTOR_ROWS, "detectors compared side by side, comma-separated: "
        + ", ".join(DETECTOR_ROWS) + ", or none", parse=detector_rows)
    seed: int = option(0, "seed of every random choice")
    device: str = option("cpu", "torch device")
    data_dir: str | None = option(None, "folder holding the dataset")
    download: bool = option(False, "download the dataset through torchvision (online)")

    def resolve(self) -> ResolvedDetectConfig:
        info = dataset_info(self.dataset)
        eps = self.eps if self.eps is not None else info.detect_eps
        check_strengths(eps)
        opts.check_at_least(self, 1, "epochs", "batch_size", "queries", "k", "pgd_steps",
                            "train_limit")
        opts.check_at_least(self, 0, "val_size", "lbfgs_queries")
        opts.check_fraction("keep", self.keep)
        opts.check_positive("lr", self.lr)
        victims.check(self.label_smoothing)
        opts.device(self.device)
        build_model(self.model or info.crafter, info)  # an unknown architecture fails here
        if not 0 <= self.adaptive_weight < float("inf"):
            raise InputError(f"adaptive_weight must be a finite number ≥ 0, got "
                             f"{self.adaptive_weight!r}")
        return ResolvedDetectConfig(**{
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "dataset": info.name, "eps": float(eps), "model": self.model or info.crafter,
            "schedule": parse_choice(Schedule, self.schedule or Schedule.CONSTANT.value,
                                     "schedule"),
            "lbfgs_queries": min(self.lbfgs_queries, self.queries)})


@dataclass(frozen=True)
class ResolvedDetectConfig:
    dataset: str
    model: str
    epochs: int
    batch_size: int
    lr: float
    schedule: Schedule
    augment: bool
    label_smoothing: float
    channels_last: bool
    val_size: int
    train_limit: int | None
    queries: int
    lbfgs_queries: int
    k: int
    eps: float
    pgd_steps: int
    keep: float
    adaptive_weight: float
    mat: bool
    detectors: tuple[str, ...]
    seed: int
    device: str
    data_dir: str | None
    download: bool

    # the side-by-side rows only read the stored model and attacks: a run resumed with other
    # --detectors reuses them (a new detector's row without training the model again)
    report_only: ClassVar[tuple[str, ...]] = ("detectors",)

    def train_config(self) -> TrainConfig:
        """The training configuration of every attacked model (clean or mixed MAT)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           seed=self.seed, device=self.device, schedule=self.schedule,
                           augment=self.augment, label_smoothing=self.label_smoothing,
                           channels_last=self.channels_last)
