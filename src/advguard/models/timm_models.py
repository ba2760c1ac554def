"""``timm:NAME`` — ``timm.create_model(NAME, pretrained=False, num_classes=…, in_chans=…)``
(``pip install 'advguard[timm]'``)."""

from __future__ import annotations

from torch import nn

from advguard.errors import InputError
from advguard.models.builders import ModelCard, Source, register_source


def build(name: str, card: ModelCard) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise InputError("timm:… models need timm: pip install timm") from None
    if not timm.is_model(name):
        raise InputError(f"timm has no model {name!r} (timm.list_models() lists them)")
    try:
        return timm.create_model(name, pretrained=False, num_classes=card.num_classes,
                                  in_chans=card.channels, **card.kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"timm:{name}: {exc}") from None


register_source("timm", Source(build))
