"""Every detector by name, in one place: the experiments, ``guard fit`` and ``serve`` build and
load detectors through :func:`build_detector` and :func:`load_detector`, and derive their
options from each detector's :attr:`~advguard.detection.Detector.Options`. A new detector is one
file and one line here."""

from __future__ import annotations

import dataclasses
import functools
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from torch import nn

from advguard.detection.base import Detector
from advguard.detection.deep_knn import DeepKNN
from advguard.detection.detector import KNNDetector
from advguard.detection.energy import EnergyDetector
from advguard.detection.layered import LayeredKNN
from advguard.detection.mahalanobis import Mahalanobis
from advguard.errors import CheckpointError, InputError, parse_choice
from advguard.io import read_metadata
from advguard.options import option, plain

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (
    KNNDetector,  # the paper's, one layer
    LayeredKNN,  # the paper's score at several layers
    DeepKNN,  # Papernot & McDaniel 2018
    Mahalanobis,  # Lee et al. 2018
    EnergyDetector,  # Liu et al. 2020
)}
DEFAULT_DETECTOR = KNNDetector.name  # the paper's


def detector_class(name: str) -> type[Detector]:
    if name not in DETECTORS:
        raise InputError(f"unknown detector {name!r}; choose one of: {', '.join(DETECTORS)}")
    return DETECTORS[name]


def build_detector(name: str, **settings: Any) -> Detector:
    """A detector by its registered name, with its own settings."""
    cls = detector_class(name)
    try:
        return cls(**settings)
    except TypeError as exc:
        raise InputError(f"detector {name!r}: {exc}") from None


def load_detector(path: str | Path, model: nn.Module | None = None) -> Detector:
    """Whatever detector ``path`` holds (files written before the registry hold a kNN one)."""
    name = read_metadata(path).get("detector", DEFAULT_DETECTOR)
    if name not in DETECTORS:
        raise CheckpointError(f"{path} holds an unknown detector {name!r}")
    return DETECTORS[name].load(path, model)


def option_owners() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every detector option's name -> the detectors that have it, with their field."""
    out: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, cls in DETECTORS.items():
        for f in dataclasses.fields(cls.Options):
            out.setdefault(f.name, []).append((name, f))
    return out


def _settings_class() -> type:
    """``DetectorSettings``: ``detector`` (a registered name) and every registered detector's
    options, each left out by default (the detector's own default then); a given option the
    chosen detector does not have is refused by :meth:`build`."""
    fields: list[tuple[str, Any, Any]] = [("detector", str, option(
        DEFAULT_DETECTOR, "the detector: " + ", ".join(DETECTORS)))]
    for name, owners in option_owners().items():
        cls = DETECTORS[owners[0][0]].Options
        hint, f = typing.get_type_hints(cls)[name], owners[0][1]
        defaults = "; ".join(f"{who}: {plain(g.default)}" for who, g in owners)
        parse = (functools.partial(parse_choice, hint, what=name.replace("_", " "))
                 if isinstance(hint, type) and issubclass(hint, Enum) else None)
        fields.append((name, hint | None if parse is None else str | None,
                       option(None, f"{f.metadata['help']} ({defaults})", parse=parse)))

    def given(self: Any) -> dict[str, Any]:
        """The options given (not left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "detector" and getattr(self, f.name) is not None}

    def build(self: Any, **common: Any) -> Detector:
        """The detector, with the options given and ``common`` settings (keep, seed, …)."""
        return build_detector(self.detector, **common, **self.given())

    def check(self: Any) -> None:
        detector_class(self.detector)

    return dataclasses.make_dataclass(
        "DetectorSettings", fields, frozen=True,
        namespace={"given": given, "build": build, "__post_init__": check,
                   "__doc__": "The detector and its options, as the command line gives them."})


DetectorSettings: Any = _settings_class()
