"""The kNN detector's settings a user chooses, each default declared once (here): the detector's
constructor, ``reproduce detect`` and ``advguard guard fit`` take them from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from advguard import options
from advguard.detection.index import INDEX_KINDS
from advguard.detection.preprocessing import Preprocessing, parse_preprocessing
from advguard.detection.scores import Weighting, parse_weighting
from advguard.errors import InputError
from advguard.evaluation.detection import KEEP
from advguard.options import option


@dataclass(frozen=True)
class KNNOptions:
    k: int = option(1000, "neighbours searched (the paper's k)")
    weighting: Weighting = option(Weighting.DWKNN, "score: knn, wknn or dwknn")
    preprocessing: Preprocessing = option(Preprocessing.PCA_WHITEN,
                                          "features: none, l2 or pca-whiten")
    keep: float = option(KEEP, "operating point: share of correctly classified validation "
                               "images kept")
    index: str = option("flat", "FAISS bank: flat (exact), ivf or ivfpq")

    def __post_init__(self) -> None:
        options.check_int("k", self.k)
        options.check_fraction("keep", self.keep)
        object.__setattr__(self, "weighting", parse_weighting(self.weighting))
        object.__setattr__(self, "preprocessing", parse_preprocessing(self.preprocessing))
        if self.index not in INDEX_KINDS:
            raise InputError(f"unknown index {self.index!r}; choose one of: "
                             f"{', '.join(INDEX_KINDS)}")
