"""What each answer of the service reveals (``serve --outputs``, ``--decimals``): the less, the
less a score-based black-box attack has to climb on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from advguard import options
from advguard.detection import Verdicts
from advguard.options import option


class Outputs(str, Enum):
    LABEL = "label"
    TOP1 = "top1"
    PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class Reveal:
    """What each answer of the service reveals: the less, the less a score-based black-box
    attack has to climb on (``label`` leaves only decision-based attacks)."""

    outputs: Outputs = option(Outputs.PROBABILITIES,
                              "what an answer reveals: label (class and verdict), top1 (and "
                              "its probability) or probabilities (every class's, the kNN score "
                              "and the threshold)")
    decimals: int = option(6, "decimals of the probabilities and scores answered")

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", Outputs(self.outputs))
        options.check_int("decimals", self.decimals, 0)

    def to_json(self) -> dict[str, Any]:
        return {"outputs": self.outputs.value, "decimals": self.decimals}


def summary(v: Verdicts, i: int, classes: int, reveal: Reveal = Reveal()  # noqa: B008
            ) -> dict[str, Any]:
    """One image's verdict as the service answers it (what ``reveal`` allows)."""
    out: dict[str, Any] = {
        "class": int(v.predicted[i]),
        "verdict": "trusted" if bool(v.trusted[i]) else "flagged",
        "unlike_training": None if v.unlike is None else bool(v.unlike[i])}
    d = reveal.decimals
    if reveal.outputs is Outputs.TOP1:
        out["confidence"] = round(float(v.probabilities[i][int(v.predicted[i])]), d)
    elif reveal.outputs is Outputs.PROBABILITIES:
        out.update(probabilities=[round(float(p), d) for p in v.probabilities[i][:classes]],
                   score=round(float(v.scores[i]), d), threshold=v.threshold)
    return out
