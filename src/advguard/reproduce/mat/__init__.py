"""The MAT experiment (paper 000, SPEC Part A) as plain stage functions over a run directory."""

from advguard.reproduce.mat.config import (
    MatConfig,
    MatrixAttack,
    MixedSize,
    ResolvedMatConfig,
    Setting,
)
from advguard.reproduce.mat.run import run_mat

__all__ = ["MatConfig", "MatrixAttack", "MixedSize", "ResolvedMatConfig", "Setting", "run_mat"]
