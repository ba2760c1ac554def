"""The MAT experiment's options (every default declared here once; the CLI is built from these
fields) and their resolved form, whose values are all filled in and checked."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from enum import Enum

from advguard import options as opts
from advguard.attacks import PGD, check_strengths
from advguard.data import VAL_SIZE, DatasetInfo, dataset_info
from advguard.ensemble import VotingRule, parse_rule
from advguard.errors import InputError, parse_choice
from advguard.models import build_model
from advguard.options import option, same_as
from advguard.reproduce import victims
from advguard.strengths import SelectOptions, Walk
from advguard.training import RecipeName, Schedule, get_recipe


class Setting(str, Enum):
    """How adversarial training data is crafted (SPEC A2)."""

    TRANSFER = "transfer"  # fixed datasets crafted on a separate crafting model
    WHITE_BOX = "white-box"  # online, on the model being trained, every batch


class MatrixAttack(str, Enum):
    """The attack filling the accuracy matrix on the validation split."""

    FGSM = "fgsm"  # the setting's FGSM (the paper's; the only one in the transfer setting)
    PGD = "pgd"  # white-box PGD: robustness FGSM cannot fake by masking its gradient


class MixedSize(str, Enum):
    FULL = "full"  # S+1 times the clean data
    REDUCED = "reduced"  # N_C in total


# The recipe each setting runs by default (see advguard.training.recipes).
DEFAULT_RECIPES = {Setting.TRANSFER: RecipeName.FGSM, Setting.WHITE_BOX: RecipeName.FGSM_RS}
PGD_MATRIX_VALIDATION_IMAGES = 1000  # a PGD accuracy matrix's default validation slice
AUTOATTACK_TEST_IMAGES = 1000  # the AutoAttack column's default test slice


@dataclass(frozen=True)
class MatConfig:
    """``advguard reproduce mat``'s options as the user gives them."""

    dataset: str = option("mnist", "mnist, fashion-mnist, cifar10, cifar100, svhn")
    setting: str = option("transfer", "transfer (the paper's) or white-box")
    strengths: tuple[float, ...] = option(
        (), "hand-picked MAT strengths, e.g. 0.1,0.2,0.3 (default: random-walk selection)",
        parse=opts.strengths)
    single_strength: float | None = option(
        None, "single-strength ε, e.g. 0.3 or 8/255 (default: the median hand-picked strength, "
        "or the best row of the accuracy matrix)", parse=opts.strength)
    tau: float = option(0.5, "MSSIM threshold bounding the strengths (SPEC A4)")
    matrix_epochs: int = option(3, "epochs of each single-strength model of the accuracy matrix")
    matrix_train_limit: int | None = option(
        None, "train accuracy-matrix models on the first N images only")
    matrix_attack: str | None = option(
        None, "attack filling the accuracy matrix: fgsm or pgd (default: fgsm in the transfer "
        "setting, pgd in the white-box setting — a default chosen by test PGD-20 grid means, "
        "not on validation)")
    matrix_pgd_steps: int = option(10, "PGD steps of a PGD accuracy matrix (step 2.5·ε/steps)")
    matrix_val_limit: int | None = option(
        None, "accuracy matrix on the first N validation images (default: all for FGSM, "
        f"{PGD_MATRIX_VALIDATION_IMAGES} for PGD)")
    recipe: str | None = option(
        None, f"training recipe: {', '.join(r.value for r in RecipeName)} (METHODS.md); "
        f"default: {DEFAULT_RECIPES[Setting.TRANSFER].value} (transfer, the paper's), "
        f"{DEFAULT_RECIPES[Setting.WHITE_BOX].value} (white-box)")
    pgd_at: bool = option(False, "also train the PGD-40 adversarial training baseline "
                                 "(white-box setting)")
    walks: int = same_as(SelectOptions, "walks")
    walk_steps: int = same_as(SelectOptions, "walk_steps")
    penalty: float = same_as(SelectOptions, "penalty")
    voting: str = option("mean", "parallel MAT voting: mean, learned, gated (the default was "
                                 "chosen by PGD on the first 1,000 test images, not on "
                                 "validation)")
    compare_voting: bool = option(False, "also fit and evaluate every voting rule on the same "
                                         "members")
    voting_epochs: int = option(30, "epochs fitting the voting unit on validation data")
    workers: int = option(1, "processes training parallel members")
    grid: tuple[float, ...] = option((), "test strengths (default: the paper's grid for the "
                                         "dataset)", parse=opts.strengths)
    mixed_size: str = option("full", "mixed MAT: full (S+1 times the data) or reduced")
    epochs: int = option(10, "victim training epochs (passes over the clean training set)")
    crafter_epochs: int = option(8, "crafting model training epochs")
    batch_size: int | None = option(None, "clean examples per step (default: the recipe's)")
    lr: float | None = option(None, "Adam learning rate, the peak of a one-cycle schedule "
                                    "(default: the recipe's)")
    schedule: str | None = victims.schedule_option("the recipe's")
    augment: bool = victims.augment_option()
    label_smoothing: float = victims.label_smoothing_option()
    channels_last: bool = victims.channels_last_option()
    val_size: int = option(VAL_SIZE, "validation images held out of the training file")
    train_limit: int | None = option(None, "first N training images only")
    test_limit: int | None = option(None, "first N test images only")
    pgd_steps: int = option(20, "white-box PGD evaluation: steps")
    pgd_restarts: int = option(1, "white-box PGD evaluation: random restarts")
    pgd_step_size: float | None = option(None, "PGD evaluation step in pixel units (default: "
                                               f"{PGD.step_scale}·ε/steps)")
    pgd_limit: int | None = option(None, "PGD on the first N test images only (default: all)")
    autoattack_limit: int = option(
        AUTOATTACK_TEST_IMAGES, "AutoAttack (standard) at the target strength on the first N "
        "test images; 0: off")
    autoattack_eps: float | None = option(
        None, "AutoAttack's target strength (default: the top of the grid)",
        parse=opts.strength)
    seed: int = option(0, "seed of every random choice")
    device: str = option("cpu", "torch device, e.g. cpu or cuda")
    data_dir: str | None = option(None, "folder holding the dataset (MNIST: optional, a copy "
                                        "ships with advguard)")
    download: bool = option(False, "download the dataset through torchvision (online)")
    victim: str | None = option(None, "victim architecture (default: the paper's for the "
                                      "dataset), e.g. small-cnn")
    crafter: str | None = option(None, "crafting architecture (default: the paper's)")

    def resolve(self) -> ResolvedMatConfig:
        """Every default filled in, every value checked, names parsed into enums."""
        info = dataset_info(self.dataset)
        setting = parse_choice(Setting, self.setting, "setting")
        recipe = get_recipe(self.recipe or DEFAULT_RECIPES[setting])
        strengths = tuple(check_strengths(self.strengths)) if self.strengths else ()
        single = self.single_strength
        if single is None and strengths:
            single = statistics.median_low(strengths)
        if single is not None:
            check_strengths(single)
        if self.penalty > 0:
            raise InputError(f"penalty must be ≤ 0, got {self.penalty}")
        matrix_attack = parse_choice(
            MatrixAttack, self.matrix_attack or (MatrixAttack.FGSM if setting is Setting.TRANSFER
                                                 else MatrixAttack.PGD), "matrix attack")
        if setting is Setting.TRANSFER and (recipe.name is not RecipeName.FGSM
                                            or matrix_attack is not MatrixAttack.FGSM
                                            or self.pgd_at):
            raise InputError("the transfer setting trains and selects with the crafting "
                             "model's FGSM only: recipe 'fgsm', matrix attack 'fgsm', no "
                             "PGD-AT (use --setting white-box)")
        matrix_val_limit = self.matrix_val_limit
        if matrix_val_limit is None and matrix_attack is MatrixAttack.PGD:
            matrix_val_limit = PGD_MATRIX_VALIDATION_IMAGES
        opts.check_at_least(self, 1, "epochs", "crafter_epochs", "batch_size", "pgd_steps",
                            "pgd_restarts", "pgd_limit", "matrix_epochs", "matrix_train_limit",
                            "walks", "voting_epochs", "workers", "matrix_pgd_steps",
                            "matrix_val_limit", "train_limit", "test_limit")
        opts.check_at_least(self, 0, "val_size", "walk_steps", "autoattack_limit")
        if self.autoattack_eps is not None:
            check_strengths(self.autoattack_eps)
        if self.pgd_step_size is not None:
            opts.check_fraction("pgd_step_size", self.pgd_step_size)
        if self.lr is not None:
            opts.check_positive("lr", self.lr)
        schedule = parse_choice(Schedule, self.schedule or recipe.schedule, "schedule")
        victims.check(self.label_smoothing)
        opts.check_fraction("tau", self.tau, low_open=False)
        opts.device(self.device)
        victim, crafter = self.victim or info.victim, self.crafter or info.crafter
        for arch in (victim, crafter):
            build_model(arch, info)  # an unknown architecture fails here, before any work
        return ResolvedMatConfig(**{
            **{k: getattr(self, k) for k in self.__dataclass_fields__},
            "dataset": info.name, "setting": setting, "strengths": strengths,
            "grid": (grid := tuple(check_strengths(self.grid or info.grid))),
            "autoattack_eps": float(max(grid) if self.autoattack_eps is None
                                    else self.autoattack_eps),
            "single_strength": None if single is None else float(single),
            "voting": parse_rule(self.voting), "recipe": recipe.name,
            "matrix_attack": matrix_attack, "mixed_size": parse_choice(
                MixedSize, self.mixed_size, "mixed size"),
            "lr": self.lr or recipe.lr, "schedule": schedule,
            "batch_size": self.batch_size or recipe.batch_size,
            "matrix_val_limit": matrix_val_limit,
            "victim": victim, "crafter": crafter})


@dataclass(frozen=True)
class ResolvedMatConfig:
    """:class:`MatConfig` with every default filled in. ``strengths`` empty: chosen by the
    random walk; ``single_strength`` ``None``: the best row of the accuracy matrix; the
    ``*_limit`` fields ``None``: no limit."""

    dataset: str
    setting: Setting
    strengths: tuple[float, ...]
    single_strength: float | None
    tau: float
    matrix_epochs: int
    matrix_train_limit: int | None
    matrix_attack: MatrixAttack
    matrix_pgd_steps: int
    matrix_val_limit: int | None
    recipe: RecipeName
    pgd_at: bool
    walks: int
    walk_steps: int
    penalty: float
    voting: VotingRule
    compare_voting: bool
    voting_epochs: int
    workers: int
    grid: tuple[float, ...]
    mixed_size: MixedSize
    epochs: int
    crafter_epochs: int
    batch_size: int
    lr: float
    schedule: Schedule
    augment: bool
    label_smoothing: float
    channels_last: bool
    val_size: int
    train_limit: int | None
    test_limit: int | None
    pgd_steps: int
    pgd_restarts: int
    pgd_step_size: float | None
    pgd_limit: int | None
    autoattack_limit: int  # 0: no AutoAttack column
    autoattack_eps: float
    seed: int
    device: str
    data_dir: str | None
    download: bool
    victim: str
    crafter: str

    @property
    def info(self) -> DatasetInfo:
        return dataset_info(self.dataset)

    @property
    def transfer(self) -> bool:
        return self.setting is Setting.TRANSFER

    @property
    def walk(self) -> Walk:
        return Walk(walks=self.walks, steps=self.walk_steps, penalty=self.penalty,
                    seed=self.seed)

    def evaluation_pgd(self) -> PGD:
        return PGD(steps=self.pgd_steps, restarts=self.pgd_restarts,
                   step_size=self.pgd_step_size, seed=self.seed)


__all__ = ["MatConfig", "MatrixAttack", "MixedSize", "ResolvedMatConfig", "Setting"]
