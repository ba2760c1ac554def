"""Parallel MAT: members per strength and the voting unit that combines them."""

from advguard.ensemble.parallel import train_parallel
from advguard.ensemble.voting import VotingEnsemble, load_ensemble, save_ensemble

__all__ = ["VotingEnsemble", "load_ensemble", "save_ensemble", "train_parallel"]
