"""What strength selection hands to the report: typed, so a renamed field fails at once.

``to_json`` gives the layout of ``results.json``'s ``details.selection`` (hand-picked runs hold
only ``source`` and the three methods' strengths)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

HAND_PICKED = "hand-picked"
RANDOM_WALK = "random walk"


@dataclass(frozen=True)
class MssimBound:
    """SPEC A4: MSSIM of FGSM copies at every grid strength and the bound τ gives."""

    grid: list[float]
    mssim: list[float]
    tau: float
    bound: float
    images: str  # which images and directions were compared


@dataclass(frozen=True)
class Choice:
    strengths: list[float]
    G: float
    H: float


@dataclass(frozen=True)
class MethodSelection:
    """One multi-strength method: the walk's choice beside the exact optimum of the same G."""

    walk: Choice
    exact: Choice
    agree: bool
    agreement_over_100_seeds: float

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> MethodSelection:
        return cls(Choice(**obj["walk"]), Choice(**obj["exact"]), bool(obj["agree"]),
                   float(obj["agreement_over_100_seeds"]))


@dataclass(frozen=True)
class StrengthSelection:
    """The strengths of every method and, for a random-walk run, how they were chosen."""

    source: str  # HAND_PICKED or RANDOM_WALK
    single: list[float]
    mixed: list[float]
    parallel: list[float]
    candidates: list[float] | None = None
    matrix: list[list[float]] | None = None  # A[i][j], validation accuracy
    matrix_attack: str | None = None
    walks: int | None = None
    steps: int | None = None
    penalty: float | None = None
    seed: int | None = None
    mssim: MssimBound | None = None
    parallel_selection: MethodSelection | None = None
    mixed_selection: MethodSelection | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StrengthSelection:
        data = dict(obj)
        if data.get("mssim") is not None:
            data["mssim"] = MssimBound(**data["mssim"])
        for key in ("parallel_selection", "mixed_selection"):
            if data.get(key) is not None:
                data[key] = MethodSelection.from_json(data[key])
        return cls(**data)
