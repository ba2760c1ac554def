"""The kNN detectors' options a user chooses, each default declared once (here): the detectors'
constructors, ``reproduce detect`` and ``advguard guard fit`` take them from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from advguard import options
from advguard.detection.index import INDEX_KINDS
from advguard.detection.preprocessing import Preprocessing, parse_preprocessing
from advguard.detection.scores import Weighting, parse_weighting
from advguard.errors import InputError
from advguard.options import option


@dataclass(frozen=True)
class KNNOptions:
    k: int = option(1000, "neighbours searched (the paper's k)")
    weighting: Weighting = option(Weighting.DWKNN, "score: knn, wknn or dwknn")
    preprocessing: Preprocessing = option(Preprocessing.PCA_WHITEN,
                                          "features: none, l2 or pca-whiten")
    index: str = option("flat", "FAISS bank: flat (exact), ivf or ivfpq")
    nlist: int = option(1024, "IVF cells (ivf, ivfpq)")
    nprobe: int = option(16, "IVF cells searched a query (ivf, ivfpq)")
    pq_m: int | None = option(None, "bytes a vector (ivfpq; a divisor of the dimension; "
                                    "default: the largest up to half of it)")
    fit_sample: int = option(100_000, "bank vectors the pre-processing and IVF cells are "
                                      "fitted on (the first)")
    familiar_keep: float = option(0.995, "share of calibration images within the bank-distance "
                                         "limit: inputs farther from every training image "
                                         "(noise, blanks, other domains) are flagged")

    def __post_init__(self) -> None:
        options.check_int("k", self.k)
        for name in ("nlist", "nprobe", "fit_sample"):
            options.check_int(name, getattr(self, name))
        if self.pq_m is not None:
            options.check_int("pq_m", self.pq_m)
        options.check_fraction("familiar_keep", self.familiar_keep)
        object.__setattr__(self, "weighting", parse_weighting(self.weighting))
        object.__setattr__(self, "preprocessing", parse_preprocessing(self.preprocessing))
        if self.index not in INDEX_KINDS:
            raise InputError(f"unknown index {self.index!r}; choose one of: "
                             f"{', '.join(INDEX_KINDS)}")
