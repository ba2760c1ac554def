"""The papers' experiments end to end, as resumable run directories."""

from advguard.reproduce.mat import DEFAULTS, MatConfig, MatRun, Setting, run_mat

__all__ = ["DEFAULTS", "MatConfig", "MatRun", "Setting", "run_mat"]
