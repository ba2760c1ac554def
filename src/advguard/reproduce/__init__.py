"""The papers' experiments end to end, as resumable run directories: orchestration only, every
computation through the public API of the packages below."""

from advguard.reproduce.mat import MatConfig, Setting, run_mat

__all__ = ["MatConfig", "Setting", "run_mat"]
