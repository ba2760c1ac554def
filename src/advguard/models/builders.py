"""Models from anywhere, described by a :class:`ModelCard` that rebuilds them.

A *builder* is named by one string, the same in Python, on the command line and in a
checkpoint:

==============================  ===========================================================
``lenet5``, ``resnet-s``, …      advguard's own architectures (:data:`~advguard.models.MODELS`)
``torchvision:resnet18``         ``torchvision.models.get_model(name, weights=None,
                                 num_classes=…)``; grey images are repeated to 3 channels
``timm:resnet18``                ``timm.create_model(name, pretrained=False, num_classes=…,
                                 in_chans=…)``
``hf:PATH``                       a Hugging Face ``transformers`` image classifier from a
                                 local folder (``save_pretrained``'s), with its image
                                 processor's normalisation (:mod:`advguard.models.huggingface`)
``my_package.my_module:build``   a factory the user writes, called with those of
                                 ``num_classes``, ``in_channels``, ``in_chans`` and
                                 ``image_size`` it accepts
==============================  ===========================================================

Sources are an open registry (:func:`register_source`, as torchvision's ``register_model``): a
new one is one module that registers itself. No weights are downloaded: a builder's model
starts untrained, or takes a user's weights (:func:`load_weights`: safetensors, or a torch file
read weights-only). Every model but the zoo's
(which normalise inside) is :func:`~advguard.models.wrap`-ped: the data's per-channel mean/std
is applied inside it, so every model takes images in [0, 1].
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advguard.data import DatasetInfo, custom_info, dataset_info
from advguard.errors import CheckpointError, InputError
from advguard.models.wrap import Wrapped
from advguard.models.zoo import MODELS
from advguard.options import option


@dataclass(frozen=True)
class Source:
    """A family of models named ``PREFIX:NAME``: ``build(NAME, card)`` makes the untrained
    network (it is wrapped with the card's normalisation); ``prepare(NAME, card)`` may fill the
    card from the source first (a config, a normalisation of its own); ``grey_to_rgb``: grey
    images are repeated to 3 channels for it."""

    build: Callable[[str, ModelCard], nn.Module]
    prepare: Callable[[str, ModelCard], ModelCard] | None = None
    grey_to_rgb: bool = False


SOURCES: dict[str, Source] = {}


def register_source(prefix: str, source: Source) -> None:
    """Make ``PREFIX:NAME`` build models of ``source`` everywhere a model is named."""
    if not prefix.isidentifier():
        raise ValueError(f"a model source prefix is a name, got {prefix!r}")
    SOURCES[prefix] = source


def _source(builder: str) -> tuple[Source, str] | None:
    prefix, sep, rest = builder.partition(":")
    return (SOURCES[prefix], rest) if sep and prefix in SOURCES else None


@dataclass(frozen=True)
class ModelCard:
    """What rebuilds a model: its builder and arguments, the input it takes and its classes,
    and the normalisation inside it. Saved in every checkpoint (``"model"`` metadata)."""

    builder: str
    channels: int
    size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # the builder's own arguments
    output: str | int | None = None  # where the logits are in the model's output
    classes: tuple[str, ...] = ()  # class names, where the data has them

    def __post_init__(self) -> None:
        """Every field in range and of its type: a card read from a file is checked before
        anything is built from it."""
        if not (1 <= self.channels <= 16 and all(1 <= s <= 16384 for s in self.size)
                and 2 <= self.num_classes <= 1_000_000):
            raise InputError(f"model description out of range: {self.channels} channels, "
                             f"size {self.size}, {self.num_classes} classes")
        if len(self.mean) != self.channels or len(self.std) != self.channels or not all(
                s > 0 for s in self.std):
            raise InputError(f"mean {list(self.mean)} and std {list(self.std)} must have one "
                             f"value per channel ({self.channels}), std > 0")
        if isinstance(self.output, bool) or not isinstance(self.output, (str, int, type(None))):
            raise InputError(f"output must be a key, an index or none, got {self.output!r}")
        try:
            json.dumps(dict(self.kwargs))
        except (TypeError, ValueError):
            raise InputError(f"builder arguments must be JSON values (they are saved in the "
                             f"checkpoint), got {dict(self.kwargs)!r}") from None

    @classmethod
    def for_data(cls, builder: str, info: DatasetInfo, **kwargs: Any) -> ModelCard:
        """The card of ``builder`` for the data described by ``info``."""
        card = cls(builder, info.channels, tuple(info.size), info.num_classes,  # type: ignore[arg-type]
                   tuple(info.mean), tuple(info.std), dict(kwargs), classes=info.classes)
        found = _source(builder)
        if found is not None and found[0].prepare is not None:
            card = found[0].prepare(found[1], card)
        return card

    @property
    def info(self) -> DatasetInfo:
        return custom_info("model", channels=self.channels, size=self.size,
                           num_classes=self.num_classes, mean=self.mean, std=self.std,
                           classes=self.classes)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        d["kwargs"], d["classes"] = dict(self.kwargs), list(self.classes)
        return d

    @classmethod
    def from_json(cls, obj: Any, where: str = "checkpoint") -> ModelCard:
        try:
            if not isinstance(obj.get("classes") or [], list) or not isinstance(
                    obj.get("kwargs") or {}, dict):
                raise TypeError("classes must be a list and kwargs an object")
            return cls(str(obj["builder"]), int(obj["channels"]),
                       (int(obj["size"][0]), int(obj["size"][1])), int(obj["num_classes"]),
                       tuple(float(m) for m in obj["mean"]), tuple(float(s) for s in obj["std"]),
                       dict(obj.get("kwargs") or {}), obj.get("output"),
                       tuple(str(c) for c in obj.get("classes") or ()))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                InputError) as exc:
            raise CheckpointError(f"{where}: the model description is malformed ({exc})"
                                  ) from None


def build(card: ModelCard) -> nn.Module:
    """The untrained model ``card`` describes (images in [0, 1] → logits)."""
    name = card.builder
    if name in MODELS:
        return MODELS[name](card.info)
    found = _source(name)
    if found is not None:
        source, rest = found
        return Wrapped(source.build(rest, card), card.mean, card.std, card.output,
                       expand_channels=3 if source.grey_to_rgb and card.channels == 1 else None)
    if ":" not in name:
        raise InputError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or "
                         f"{', '.join(f'{p}:NAME' for p in SOURCES)}, package.module:factory")
    return Wrapped(_factory(name, card), card.mean, card.std, card.output)


def _factory(spec: str, card: ModelCard) -> nn.Module:
    module_name, _, attr = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises on import
        raise InputError(f"cannot import the model builder {spec!r}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                         ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"the model builder {spec!r}: {module_name} has no function {attr!r}")
    offered = {"num_classes": card.num_classes, "in_channels": card.channels,
               "in_chans": card.channels, "image_size": card.size[0]}
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    args = offered if takes_any else {k: v for k, v in offered.items() if k in params}
    try:
        net = factory(**{**args, **card.kwargs})
    except TypeError as exc:
        raise InputError(f"the model builder {spec!r} cannot be called with "
                         f"{sorted({**args, **card.kwargs})}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise InputError(f"the model builder {spec!r} returned {type(net).__name__}, not a "
                         "torch.nn.Module")
    return net


def runs_user_code(builder: str) -> bool:
    """Whether building ``builder`` imports and calls a user's code (``package.module:factory``),
    as opposed to advguard's own builders or a registered source's."""
    return builder not in MODELS and _source(builder) is None


def card_for(builder: str, data: str | DatasetInfo, **kwargs: Any) -> ModelCard:
    """The card of ``builder`` for a dataset name or :class:`DatasetInfo`."""
    info = data if isinstance(data, DatasetInfo) else dataset_info(data)
    return ModelCard.for_data(builder, info, **kwargs)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a user's state dict into ``model``: a safetensors file, or a torch file read with
    ``weights_only=True`` (a plain state dict, or ``{"state_dict": …}`` / ``{"model": …}``).
    The weights of a wrapped model's inner module are taken as they are."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and weights-only refusals all land here
            raise CheckpointError(f"{path} is not a weights file torch can read weights-only: "
                                  f"{str(exc).splitlines()[0]}") from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state) and not hasattr(model, "mean"):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DDP
    target = model
    if isinstance(model, Wrapped) and not {"mean", "std"} <= set(state):
        target = model.module  # the user's network's own weights
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
    try:
        target.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {path} do not fit the model: "
                              f"{_first_problem(str(exc))}") from None
    return model


def _first_problem(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return " ".join(lines[1:3]) if len(lines) > 1 else lines[0]


def build_model(name: str, data: str | DatasetInfo, **kwargs: Any) -> nn.Module:
    """Build ``name`` (any builder above) for a dataset name or :class:`DatasetInfo`."""
    return build(card_for(name, data, **kwargs))


@dataclass(frozen=True)
class ModelOptions:
    """Which model a command builds; every model option of the command line is a field here."""

    model: str | None = option(
        None, "lenet5, resnet-s, … (advguard's), torchvision:NAME, timm:NAME or "
        "package.module:factory; default: the data's victim architecture, or the checkpoint's")
    weights: str | None = option(
        None, "the model's weights: safetensors, or a torch file read weights-only (a state "
        "dict); default: untrained, or the checkpoint's")
    trust_builder: bool = option(
        False, "load checkpoints whose builder is a package.module:factory (that imports and "
        "runs the package's code; only for files you trust)")

    def build(self, info: DatasetInfo, default: str | None = None) -> tuple[nn.Module, ModelCard]:
        """``(model, card)`` of this builder (or ``default``, or the data's victim) for data
        ``info``, with the weights loaded if given."""
        card = ModelCard.for_data(self.model or default or info.victim, info)
        net = build(card)
        if self.weights is not None:
            load_weights(net, self.weights)
        return net, card
