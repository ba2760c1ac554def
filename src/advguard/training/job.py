"""One model trained from start to checkpoint: what ``advguard train`` runs.

The data (:class:`~advguard.data.DataOptions`), the model (:class:`~advguard.models.ModelOptions`),
the method (:class:`TrainJob`) and the optimisation (:class:`~advguard.training.TrainConfig`,
the recipe's where not given) are four dataclasses whose fields are the command's options. The
checkpoint describes itself: the model card (builder, input, classes, normalisation), the data
it was trained on and the whole training config.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from advguard import distributed
from advguard import options as opts
from advguard.attacks import norm_named
from advguard.data import DataOptions, ImageSet
from advguard.errors import InputError
from advguard.io import check_output, hold_lock, load_array
from advguard.models import ModelOptions, accuracy, load_model, save_model
from advguard.options import option
from advguard.training.config import Optimizer
from advguard.training.loop import train
from advguard.training.recipes import RecipeName, get_recipe
from advguard.training.sources import AdversarialSource, Transfer, WhiteBox

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """What one model is trained for; the options of ``advguard train`` beside data, model and
    optimisation."""

    strengths: tuple[float, ...] = option(
        (), "FGSM strengths mixed into each batch, e.g. 0.1,0.2 or 4/255,8/255 (with --norm "
        "l2: L2 radii, e.g. 1,2); left out: clean training", parse=opts.radii)
    norm: str = option("linf", "threat model of the white-box copies: linf, or l2 (the "
                               "recipe's L2 form: FGSM becomes FGM, PGD steps in the L2 ball)")
    reduced: bool = option(False, "mixed MAT, reduced size")
    crafter: str | None = option(None, "crafting model checkpoint for the transfer setting "
                                       "(default: white-box, online)")
    recipe: RecipeName = option(
        RecipeName.FGSM, "white-box recipe: " + ", ".join(r.value for r in RecipeName))
    train_limit: int | None = option(None, "first N training images")

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipe", get_recipe(self.recipe).name)
        ball = norm_named(self.norm)
        get_recipe(self.recipe).in_norm(ball.name)  # a recipe without an L2 form: refused
        if self.strengths:
            ball.check_all(list(self.strengths))
        if self.train_limit is not None:
            opts.check_int("train_limit", self.train_limit)


@dataclass(frozen=True)
class Trained:
    path: Path
    test_accuracy: float
    seconds: float


def train_job(out: str | Path, job: TrainJob, model: ModelOptions, data: DataOptions,
              overrides: dict[str, Any] | None = None, *, progress: bool = True) -> Trained | None:
    """Train the model ``job`` describes and write it to ``out`` (``.safetensors``); returns
    what was written (``None`` on ranks other than 0 under torchrun). ``overrides``:
    :class:`TrainConfig` fields given (the recipe's for the rest). Resumable: an interrupted
    run continues from ``out``'s ``.state.pt``."""
    out = Path(out)
    how = get_recipe(job.recipe).in_norm(job.norm)
    config = how.config(**(overrides or {}))
    check_output(out)
    state = check_output(out.with_suffix(".state.pt"))
    if job.crafter is not None and (how.name is not RecipeName.FGSM or how.norm != "linf"):
        raise InputError("a crafting model (transfer setting) trains with --recipe fgsm only, "
                         "in L∞ (its FGSM directions)")
    crafting_model = None if job.crafter is None else load_model(
        job.crafter, trust_builder=model.trust_builder)[0]
    if config.optimizer is Optimizer.SGD and "lr" not in (overrides or {}):
        log.warning("--optimizer sgd with the recipe's learning rate %g, which is tuned for "
                    "Adam: give --lr (0.05-0.1 is usual for SGD)", config.lr)
    info = data.info()
    torch.manual_seed(config.seed)
    net, card = model.build(info)  # an unknown builder fails before the data loads
    train_set = data.load_training(augment=config.augment, limit=job.train_limit)
    test = data.load("test")
    lock = (hold_lock(out.with_suffix(".lock"), f"output {out}") if distributed.is_main()
            else contextlib.nullcontext())
    with lock:
        source: AdversarialSource = WhiteBox(how.attack)
        directions = _directions_path(out)
        if crafting_model is not None and job.strengths:
            source = Transfer(_transfer_directions(crafting_model, train_set, directions,
                                                   resuming=state.exists(), config=config,
                                                   workers=data.workers, progress=progress))
        pin = {"arch": card.builder, "dataset": info.name, "train_images": len(train_set),
               "recipe": how.name, **({} if how.norm == "linf" else {"norm": how.norm}),
               "crafter": None if job.crafter is None else str(Path(job.crafter)),
               **({} if model.weights is None else {"weights": str(model.weights)})}
        result = train(net, train_set, how.mix(job.strengths, reduced=job.reduced), source,
                       config, state_path=state, pin=pin, progress=progress,
                       workers=data.workers)
        directions.unlink(missing_ok=True)  # every rank's: training is over
        device = distributed.device_for_rank(config.device)
        acc = accuracy(net, test, device=device, workers=data.workers)
        if not distributed.is_main():
            return None
        save_model(out, net, card=card, dataset=info.name, data=data.to_json(),
                   train_config=opts.as_json(config), strengths=list(job.strengths),
                   train_seconds=result.seconds, history=result.history, test_accuracy=acc,
                   refreshed_batchnorm=result.refreshed_batchnorm or None,
                   recipe=how.name.value, norm=how.norm, processes=distributed.world_size(),
                   # the float sums' order, hence the weights, depend on these two
                   threads=torch.get_num_threads(), torch=torch.__version__)
        state.unlink(missing_ok=True)
    return Trained(out, acc, result.seconds)


def _directions_path(out: Path) -> Path:
    """Where a run's transfer directions live while it trains (one file per rank: each rank
    crafts them all, as it does in memory)."""
    rank = "" if distributed.world_size() == 1 else f".rank{distributed.rank()}"
    return out.with_suffix(f".directions{rank}.npy")


def _transfer_directions(crafter: torch.nn.Module, train_set: Any, path: Path, *,
                         resuming: bool, config: Any, workers: int,
                         progress: bool) -> torch.Tensor:
    """The crafting model's FGSM directions of the training images (the transfer setting):
    in memory for a dataset held in memory, otherwise in an int8 file beside the checkpoint,
    memory-mapped (a folder of any size), and reused when the run resumes."""
    from advguard.attacks import fgsm_directions, fgsm_directions_file

    if isinstance(train_set, ImageSet):
        return fgsm_directions(crafter, train_set.x, train_set.y, device=config.device,
                               progress=progress)
    if config.augment:
        raise InputError("the transfer setting on an image folder trains without --augment: "
                         "the folder's crops are drawn as it is read, and a direction crafted "
                         "once cannot follow them")
    if resuming and path.exists():  # the state's pin (crafter path, images) was checked
        directions = load_array(path)
        if directions.shape == (len(train_set), *train_set[0][0].shape):
            return directions
    return fgsm_directions_file(crafter, train_set, path, device=config.device, workers=workers,
                                progress=progress)
