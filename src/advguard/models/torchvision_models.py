"""``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None, num_classes=…)``;
grey images are repeated to 3 channels for it (torchvision's models take colour)."""

from __future__ import annotations

from torch import nn

from advguard.errors import InputError
from advguard.models.builders import ModelCard, Source, register_source


def build(name: str, card: ModelCard) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models():
        raise InputError(f"torchvision has no model {name!r} (torchvision.models.list_models() "
                         "lists them)")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=card.num_classes,
                                            **card.kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"torchvision:{name}: {exc}") from None


register_source("torchvision", Source(build, grey_to_rgb=True))
