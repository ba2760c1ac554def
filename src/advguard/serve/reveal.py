"""What each answer of the service reveals (``serve --outputs``, ``--decimals``): the less, the
less a score-based black-box attack has to climb on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from advguard import options
from advguard.detection import Verdicts
from advguard.options import option
from advguard.serve.policy import ClientStatus


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
    decimals: int = option(6, "decimals of every number answered that is not a count "
                              "(probabilities, scores, the window's mean score)")
    flagged_class: bool = option(True, "answer a flagged input's class; --no-flagged-class "
                                       "fails closed: a flagged answer carries its verdict "
                                       "only, so an attack that gets an input flagged learns "
                                       "nothing from it")

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", Outputs(self.outputs))
        options.check_int("decimals", self.decimals, 0)

    def to_json(self) -> dict[str, Any]:
        return {"outputs": self.outputs.value, "decimals": self.decimals,
                "flagged_class": self.flagged_class}


# what a client's status reveals beyond its counts of requests and verdicts: the window's mean
# kNN score moves with each query's score (from two consecutive answers the score of the
# second comes back), and the watch's counts say which queries it detected (the oracle an
# adaptive attacker tunes its steps on, as OARS does); answered with --outputs probabilities
# only
SCORED_STATUS = ("window_mean_score", "recent_repeats", "queries", "linked", "recent_flips")


def summary(v: Verdicts, i: int, classes: int, reveal: Reveal = Reveal(),  # noqa: B008
            names: tuple[str, ...] = ()) -> dict[str, Any]:
    """One image's verdict as the service answers it (what ``reveal`` allows); ``names``: the
    class names (a folder's), answered as ``label`` beside the class index."""
    trusted = bool(v.trusted[i])
    c = int(v.predicted[i])
    out: dict[str, Any] = {
        "class": c, **({"label": names[c]} if c < len(names) else {}),
        "verdict": "trusted" if trusted else "flagged",
        "unlike_training": None if v.unlike is None else bool(v.unlike[i])}
    if not trusted and not reveal.flagged_class:
        return withheld(out, reveal)
    d = reveal.decimals
    if reveal.outputs is Outputs.TOP1:
        out["confidence"] = round(float(v.probabilities[i][int(v.predicted[i])]), d)
    elif reveal.outputs is Outputs.PROBABILITIES:
        out.update(probabilities=[round(float(p), d) for p in v.probabilities[i][:classes]],
                   score=round(float(v.scores[i]), d), threshold=round(float(v.threshold), d))
    return out


def withheld(result: dict[str, Any], reveal: Reveal) -> dict[str, Any]:
    """``result`` as ``reveal`` lets it be told: failing closed (``--no-flagged-class``), a
    flagged answer carries its verdict only."""
    if result.get("verdict") != "flagged" or reveal.flagged_class:
        return result
    return {"class": None, "verdict": "flagged", "unlike_training": result.get("unlike_training")}


def public_status(status: ClientStatus, reveal: Reveal = Reveal()  # noqa: B008
                  ) -> dict[str, Any]:
    """A client's status as its answers carry it: what ``reveal`` allows, every number that is
    not a count rounded to ``reveal.decimals``."""
    out = status.to_json()
    if reveal.outputs is not Outputs.PROBABILITIES:
        return {k: v for k, v in out.items() if k not in SCORED_STATUS}
    out["window_mean_score"] = round(float(out["window_mean_score"]), reveal.decimals)
    return out
