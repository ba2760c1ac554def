"""The kNN detection experiment (paper 003, SPEC Part B) as stage functions over a run
directory."""

from advguard.reproduce.detect.config import DetectConfig, ResolvedDetectConfig
from advguard.reproduce.detect.run import run_detect

__all__ = ["DetectConfig", "ResolvedDetectConfig", "run_detect"]
