"""Parallel MAT: members per strength and the voting unit that combines them."""

from advguard.ensemble.parallel import ParallelResult, train_parallel
from advguard.ensemble.voting import (
    VotingEnsemble,
    VotingRule,
    fit_voting,
    load_any,
    load_ensemble,
    open_model,
    parse_rule,
    save_ensemble,
)

__all__ = ["ParallelResult", "VotingEnsemble", "VotingRule", "fit_voting", "load_any", "open_model",
           "load_ensemble",
           "parse_rule", "save_ensemble", "train_parallel"]
