"""A guard folder: everything the service needs to classify, score and flag inputs, in one place.

``GUARD_DIR/``
  ``model.safetensors``     the classifier (any advguard model or ensemble checkpoint, copied)
  ``detector.safetensors``  the fitted detector (``--detector``: the paper's kNN by default;
                            any registered one), with its threshold
  ``guard.json``            what was fitted on what: dataset, detector settings, calibration,
                            the bank-distance limit and the calibrated query watch
  ``keys.json``             API keys of the clients and admins (created once, never overwritten)
"""

from __future__ import annotations

import hashlib
import hmac
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
    DETECTORS,
    AnyDetector,
    KNNDetector,
    KNNOptions,
    Verdicts,
    build_detector,
    load_detector,
)
from advguard.ensemble import load_any, open_model
from advguard.errors import CheckpointError, InputError
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
    k: int
    weighting: str
    preprocessing: str
    keep: float  # share of correctly classified calibration images kept
    threshold: float
    bank_images: int
    calibration_images: int
    calibration_kept: float  # measured share kept at the threshold
    fitted_at: str
    advguard: str
    # added later: guard folders fitted before have neither (their service runs without them)
    distance_limit: float | None = None  # farther from the bank: unlike any training image
    familiar_keep: float | None = None  # share of calibration images within distance_limit
    queries: dict[str, Any] | None = None  # the calibrated QueryWatch
    detector: str = KNNDetector.name  # the registered detector (folders before it: kNN)
    layers: list[str] | None = None  # the layers it reads

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

    def __init__(self, model: nn.Module, detector: AnyDetector, config: GuardConfig,
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
            config = GuardConfig(**read_json(folder / CONFIG))
        except TypeError as exc:
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
    """How a guard's detector is fitted, beside its :class:`KNNOptions`."""

    val_size: int = option(VAL_SIZE, "calibration images held out of the training split")
    train_limit: int | None = option(None, "first N training images (bank and calibration)")
    seed: int = option(0, "the calibration split's seed")
    device: str = option("cpu", "torch device of the feature extraction")
    familiar_keep: float = option(0.995, "share of calibration images within the bank-distance "
                                         "limit: inputs farther from every training image "
                                         "(noise, blanks, other domains) are flagged")
    detector: str = option(KNNDetector.name, "the detector: " + ", ".join(DETECTORS)
                           + " (k, weighting and pre-processing apply to knn and knn-layers)")

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise InputError(f"unknown detector {self.detector!r}; choose one of: "
                             f"{', '.join(DETECTORS)}")
        options.check_int("val_size", self.val_size)
        options.check_fraction("familiar_keep", self.familiar_keep)
        if self.train_limit is not None:
            options.check_int("train_limit", self.train_limit)
        options.device(self.device)


def fit_guard(source: str | Path | None, out: str | Path, *,
              knn: KNNOptions = KNNOptions(), fit: GuardFit = GuardFit(),  # noqa: B008
              model: ModelOptions = ModelOptions(), data: DataOptions = DataOptions(),
              watch: QueryWatch = QueryWatch(), progress: bool = False) -> Guard:  # noqa: B008
    """Fit a guard folder ``out`` for the model at ``source`` (a checkpoint or a ``reproduce
    detect`` run directory; or ``None`` and a builder with weights in ``model``): the
    detector's bank is the model's training-set features, streamed batch by batch; its
    threshold keeps ``knn.keep`` of the correctly classified held-out validation images, its
    bank-distance limit ``fit.familiar_keep`` of all of them, and the query watch's threshold
    is calibrated on them to ``watch.query_false_alarm``."""
    out = check_output(out, directory=True)
    detector = _detector(knn, fit)  # bad settings: refused now
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
    detector.fit(net, bank, progress=progress, workers=data.workers)
    limit, familiar = None, None
    if isinstance(detector, KNNDetector):
        # one pass over the calibration images: the threshold and its measured keep
        predicted, scores, labels, distances = detector.inspect_dataset(
            val, workers=data.workers, distances=True)
        threshold = detector.calibrate(predicted, scores, labels)
        limit = detector.set_distance_limit(distances, fit.familiar_keep)
        familiar = float((distances <= limit).mean())
    else:  # what the detector fits on held-out images, then the threshold
        predicted, scores, labels = detector.fit_held_out_data(val, workers=data.workers)
        threshold = float(detector.offset_)  # type: ignore[arg-type]
    codes = np.concatenate([encode(x) for x, _, _ in batches(val, batch_size=500,
                                                          workers=data.workers)])
    watch = calibrate(codes, watch, seed=fit.seed)
    right = predicted == labels
    card = model_card(meta, path or "the model", trust_builder=True)  # opened above
    config = GuardConfig(
        dataset=str(meta.get("dataset", data.source)), source=str(source or model.model),
        k=knn.k, weighting=knn.weighting.value,
        preprocessing=knn.preprocessing.value, keep=knn.keep, threshold=threshold,
        bank_images=len(bank), calibration_images=int(right.sum()),
        calibration_kept=float((scores[right] >= threshold).mean()),
        fitted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), advguard=__version__,
        distance_limit=limit, familiar_keep=familiar, queries=watch.to_json(),
        detector=detector.name, layers=detector.layer_keys)
    out.mkdir(parents=True, exist_ok=True)
    if path is not None:
        shutil.copyfile(path, out / MODEL)
    else:  # a builder with a user's weights becomes an advguard checkpoint
        save_model(out / MODEL, net, card=card, dataset=config.dataset, data=data.to_json())
    detector.save(out / DETECTOR)
    write_json(out / CONFIG, asdict(config))
    if not (out / KEYS).exists():
        write_keys(out / KEYS, {secrets.token_urlsafe(24): Client("admin", admin=True),
                                secrets.token_urlsafe(24): Client("client-1")})
    return Guard(net, detector, config, card.info)


def _detector(knn: KNNOptions, fit: GuardFit) -> AnyDetector:
    """The detector ``fit.detector`` names, with the settings that apply to it."""
    common: dict[str, Any] = {"keep": knn.keep, "device": fit.device, "seed": fit.seed}
    if fit.detector == KNNDetector.name:
        return KNNDetector(k=knn.k, weighting=knn.weighting, preprocessing=knn.preprocessing,
                           index=knn.index, **common)
    if fit.detector == "knn-layers":
        common.update(k=knn.k, weighting=knn.weighting, preprocessing=knn.preprocessing)
    return build_detector(fit.detector, **common)


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
    """The API keys of a service, looked up in constant time: only SHA-256 digests are kept,
    and a presented key's digest is compared with every one (``hmac.compare_digest``, no early
    exit), so the time an answer takes says nothing about how much of a key was right."""

    def __init__(self, keys: dict[str, Client]) -> None:
        self._entries = [(_digest(key), client) for key, client in keys.items()]

    def lookup(self, key: str) -> Client | None:
        presented = _digest(key)
        found = None
        for digest, client in self._entries:
            if hmac.compare_digest(digest, presented):
                found = client
        return found

    def __len__(self) -> int:
        return len(self._entries)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


__all__ = ["Client", "Guard", "GuardConfig", "GuardFit", "KeyRing", "fit_guard", "read_keys",
           "write_keys"]
