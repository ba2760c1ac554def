"""The papers' experiments end to end, as resumable run directories."""

from advguard.reproduce.mat import DEFAULT_GRIDS, MatConfig, MatRun, Setting, run_mat

__all__ = ["DEFAULT_GRIDS", "MatConfig", "MatRun", "Setting", "run_mat"]
