"""A guard folder: everything the service needs to classify, score and flag inputs, in one place.

``GUARD_DIR/``
  ``model.safetensors``     the classifier (any advguard model or ensemble checkpoint, copied)
  ``detector.safetensors``  the fitted detector (``--detector``: the paper's kNN by default;
                            any registered one), with its threshold
  ``guard.json``            what was fitted on what: dataset, the detector and its options,
                            calibration, what the detector fitted on held-out images (the kNN's
                            bank-distance limit) and the calibrated query watch
  ``keys.json``             API keys of the clients and admins (created once, never overwritten)
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advguard import __version__, options
from advguard.data import VAL_SIZE, DataOptions, DatasetInfo, batches, subset, train_val_split
from advguard.detection import (
    DEFAULT_DETECTOR,
    Detector,
    DetectorSettings,
    Verdicts,
    load_detector,
)
from advguard.ensemble import load_any, open_model
from advguard.errors import CheckpointError, InputError
from advguard.evaluation.detection import KEEP
from advguard.io import check_output, read_json, write_json, write_text
from advguard.models import ModelOptions, model_card, save_model
from advguard.options import option
from advguard.serve.queries import ENCODING, QueryWatch, calibrate, encode

MODEL, DETECTOR, CONFIG, KEYS = ("model.safetensors", "detector.safetensors", "guard.json",
                                 "keys.json")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardConfig:
    dataset: str
    source: str  # the checkpoint or run directory the model came from
    keep: float  # share of correctly classified calibration images kept
    threshold: float
    bank_images: int
    calibration_images: int
    calibration_kept: float  # measured share kept at the threshold
    fitted_at: str
    advguard: str
    detector: str = DEFAULT_DETECTOR  # the registered detector (older folders: the kNN)
    settings: dict[str, Any] | None = None  # the detector's options (its Options' fields)
    fitted: dict[str, Any] | None = None  # what it fitted on held-out images (fitted_meta)
    queries: dict[str, Any] | None = None  # the calibrated QueryWatch (older folders: none)
    layers: list[str] | None = None  # the layers it reads

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> GuardConfig:
        """``guard.json``; folders fitted before the detectors were one family held the kNN's
        options and its bank-distance limit as fields of their own."""
        obj = dict(obj)
        old = {k: obj.pop(k) for k in ("k", "weighting", "preprocessing") if k in obj}
        limit = {k: obj.pop(k) for k in ("distance_limit", "familiar_keep") if k in obj}
        if old and obj.get("settings") is None:
            obj["settings"] = old
        if limit and obj.get("fitted") is None:
            obj["fitted"] = {"distance_limit": limit.get("distance_limit"),
                             "familiar_kept": limit.get("familiar_keep")}
        return cls(**obj)

    def watch(self) -> QueryWatch | None:
        """The calibrated query watch; None if the folder has none, or one calibrated for an
        earlier encoding of the queries (its threshold would not mean the same)."""
        if self.queries is None or self.queries.get("encoding") != ENCODING:
            return None
        return QueryWatch(**self.queries)


@dataclass(frozen=True)
class Client:
    id: str
    admin: bool = False


class Guard:
    """The model and its detector: ``verdicts(x)`` for a batch of images in [0, 1]."""

    def __init__(self, model: nn.Module, detector: Detector, config: GuardConfig,
                 info: DatasetInfo) -> None:
        self.model = model.eval()
        self.detector = detector
        self.config = config
        self.info = info  # the input the model takes and its classes (from its card)

    def verdicts(self, x: torch.Tensor) -> Verdicts:
        return self.detector.verdicts(x)

    @classmethod
    def load(cls, folder: str | Path, *, trust_builder: bool = False) -> Guard:
        folder = Path(folder)
        for name in (MODEL, DETECTOR, CONFIG):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder} is not a guard folder (no {name}); make one "
                                      "with advguard guard fit")
        try:
            config = GuardConfig.from_json(read_json(folder / CONFIG))
        except (TypeError, AttributeError) as exc:
            raise CheckpointError(f"{folder / CONFIG} is not a guard description: {exc}"
                                  ) from None
        model, meta = load_any(folder / MODEL, trust_builder=trust_builder)
        detector = load_detector(folder / DETECTOR, model)
        if detector.offset_ is None:
            raise CheckpointError(f"{folder / DETECTOR} holds no threshold")
        return cls(model, detector, config, model_card(meta, folder / MODEL).info)


def _model_file(source: Path) -> Path:
    """A checkpoint, or the attacked model of a ``reproduce detect`` run directory."""
    if source.is_dir():
        candidate = source / "checkpoints" / "model.safetensors"
        if not candidate.is_file():
            raise CheckpointError(f"{source} holds no checkpoints/model.safetensors (a "
                                  "reproduce detect run directory, or give a checkpoint)")
        return candidate
    if not source.is_file():
        raise CheckpointError(f"checkpoint not found: {source}")
    return source


@dataclass(frozen=True)
class GuardFit:
    """How a guard's detector is fitted, beside the detector and its options
    (:data:`~advguard.detection.DetectorSettings`)."""

    val_size: int = option(VAL_SIZE, "calibration images held out of the training split")
    train_limit: int | None = option(None, "first N training images (bank and calibration)")
    seed: int = option(0, "the calibration split's seed")
    device: str = option("cpu", "torch device of the feature extraction")
    keep: float = option(KEEP, "operating point: share of correctly classified validation "
                               "images kept")

    def __post_init__(self) -> None:
        options.check_int("val_size", self.val_size)
        options.check_fraction("keep", self.keep)
        if self.train_limit is not None:
            options.check_int("train_limit", self.train_limit)
        options.device(self.device)


def fit_guard(source: str | Path | None, out: str | Path, *,
              detector: Any = DetectorSettings(), fit: GuardFit = GuardFit(),  # noqa: B008
              model: ModelOptions = ModelOptions(), data: DataOptions = DataOptions(),
              watch: QueryWatch = QueryWatch(), progress: bool = False) -> Guard:  # noqa: B008
    """Fit a guard folder ``out`` for the model at ``source`` (a checkpoint or a ``reproduce
    detect`` run directory; or ``None`` and a builder with weights in ``model``) with the
    ``detector`` (:data:`~advguard.detection.DetectorSettings`): its bank is the model's
    training-set features, streamed batch by batch; what it fits on held-out images (the kNN's
    bank-distance limit) and its threshold, which keeps ``fit.keep`` of the correctly
    classified ones, come from the validation images held out of the bank, and the query
    watch's threshold is calibrated on them to ``watch.query_false_alarm``."""
    out = check_output(out, directory=True)
    det = detector.build(keep=fit.keep, device=fit.device, seed=fit.seed)  # refused now
    path = None if source is None else _model_file(Path(source))
    net, meta, data = open_model(path, model, data)
    full = data.load("train", limit=fit.train_limit)
    held = min(fit.val_size, len(full) // 5)
    if held < fit.val_size:
        log.warning("--val-size %d of %d training images: %d held out for calibration (at "
                    "most a fifth; the rest is the detector's bank)", fit.val_size, len(full),
                    held)
    tr, va = train_val_split(len(full), held, fit.seed)
    # the bank in a seeded shuffled order: the pre-processing (and IVF cells) are fitted on
    # its first vectors, which must not be the first classes of a folder
    tr = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(fit.seed))]
    bank, val = subset(full, tr), subset(full, va)
    det.fit(net, bank, progress=progress, workers=data.workers)
    # one pass over the calibration images: what the detector fits on them, the threshold
    predicted, scores, labels = det.fit_held_out_data(val, workers=data.workers)
    threshold = float(det.offset_)
    codes = np.concatenate([encode(x) for x, _, _ in batches(val, batch_size=500,
                                                          workers=data.workers)])
    watch = calibrate(codes, watch, seed=fit.seed)
    right = predicted == labels
    card = model_card(meta, path or "the model", trust_builder=True)  # opened above
    config = GuardConfig(
        dataset=str(meta.get("dataset", data.source)), source=str(source or model.model),
        keep=fit.keep, threshold=threshold,
        bank_images=len(bank), calibration_images=int(right.sum()),
        calibration_kept=float((scores[right] >= threshold).mean()),
        fitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), advguard=__version__,
        detector=det.name, settings=options.as_json(det.options), fitted=det.fitted_meta(),
        queries=watch.to_json(), layers=det.layer_keys)
    out.mkdir(parents=True, exist_ok=True)
    if path is not None:
        shutil.copyfile(path, out / MODEL)
    else:  # a builder with a user's weights becomes an advguard checkpoint
        save_model(out / MODEL, net, card=card, dataset=config.dataset, data=data.to_json())
    det.save(out / DETECTOR)
    write_json(out / CONFIG, asdict(config))
    if not (out / KEYS).exists():
        write_keys(out / KEYS, {secrets.token_urlsafe(24): Client("admin", admin=True),
                                secrets.token_urlsafe(24): Client("client-1")})
    return Guard(net, det, config, card.info)


def write_keys(path: Path, keys: dict[str, Client]) -> Path:
    path = write_text(path, json.dumps({"keys": {k: asdict(c) for k, c in keys.items()}},
                                       indent=2) + "\n")
    path.chmod(0o600)
    return path


def read_keys(path: str | Path) -> dict[str, Client]:
    """``{"keys": {"<key>": {"id": "alice", "admin": false}, …}}`` → key → client."""
    obj: Any = read_json(path)
    keys = obj.get("keys") if isinstance(obj, dict) else None
    if not isinstance(keys, dict) or not keys:
        raise InputError(f"{path} must hold {{\"keys\": {{\"<key>\": {{\"id\": \"alice\", "
                         "\"admin\": false}}}}}} with at least one key")
    out: dict[str, Client] = {}
    for key, entry in keys.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or len(key) < 16:
            raise InputError(f"{path}: every key needs an 'id' and at least 16 characters")
        out[key] = Client(entry["id"], bool(entry.get("admin", False)))
    return out


class KeyRing:
    """The API keys of a service, looked up by their SHA-256 digest: only digests are kept and
    a presented key's digest is found in a dict, one step for any number of keys. The time an
    answer takes can depend on how much of a stored *digest* the presented one matched, which
    says nothing about the key itself: steering a digest's first bytes is a preimage search."""

    def __init__(self, keys: dict[str, Client]) -> None:
        self._clients = {_digest(key): client for key, client in keys.items()}

    def lookup(self, key: str) -> Client | None:
        return self._clients.get(_digest(key))

    def __len__(self) -> int:
        return len(self._clients)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


__all__ = ["Client", "Guard", "GuardConfig", "GuardFit", "KeyRing", "fit_guard", "read_keys",
           "write_keys"]
