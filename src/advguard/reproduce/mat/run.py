"""The MAT experiment end to end (paper 000, SPEC Part A): train the four methods, evaluate
their robustness curves under transfer FGSM, white-box FGSM and white-box PGD, write the report.

The run directory is the unit of resumption: ``config.json`` fixes the experiment, every stage
(crafting model, FGSM direction datasets, each method's model, each evaluation) is stored under
``checkpoints/`` as soon as it finishes, and training saves its state every epoch. Running the
same command again continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from advguard import distributed
from advguard.attacks import PGD
from advguard.io import read_metadata
from advguard.reports import MatResults, write_html_report, write_report
from advguard.reproduce.mat.config import MatConfig
from advguard.reproduce.mat.methods import (
    PARALLEL_MEMBERS,
    evaluate,
    primary_attack,
    voting_comparison,
)
from advguard.reproduce.mat.stages import Mat, load_data, selection
from advguard.reproduce.rundir import open_run
from advguard.training import PAPER_METHODS, Method, get_recipe


def run_mat(config: MatConfig, out: str | Path, *, progress: bool = True) -> MatResults:
    """Run (or resume) the MAT experiment in ``out`` and write its report there."""
    with open_run(config, out) as (cfg, run):
        return _run(Mat(cfg, run, load_data(cfg), progress), out)


def _run(m: Mat, out: str | Path) -> MatResults:
    cfg, run = m.cfg, m.run
    chosen = selection(m)
    names = list(PAPER_METHODS) + ([Method.PGD_AT] if cfg.pgd_at else [])
    methods = {name.value: evaluate(m, name) for name in names}
    voting = voting_comparison(m) if cfg.compare_voting else None
    crafter_meta = read_metadata(run.path("crafter.safetensors"))
    members_meta = read_metadata(run.path(f"{PARALLEL_MEMBERS}.safetensors"))
    recipe, d = get_recipe(cfg.recipe), m.data
    results = MatResults(
        dataset=cfg.dataset, setting=cfg.setting.value, attack=primary_attack(m).value,
        grid=list(cfg.grid), methods=methods,
        details={"victim": cfg.victim, "crafter": cfg.crafter,
                 "crafter_test_accuracy": crafter_meta["test_accuracy"],
                 "mixed_size": cfg.mixed_size.value, "seed": cfg.seed,
                 "voting_rule": cfg.voting.value, "train_size": len(d.train),
                 "val_size": len(d.val), "test_size": len(d.test),
                 "recipe": {"name": recipe.name.value, "summary": recipe.summary,
                            "schedule": cfg.schedule.value, "lr": cfg.lr,
                            "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                            "augment": cfg.augment, "label_smoothing": cfg.label_smoothing},
                 "pgd": {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts,
                         "test_images": min(cfg.pgd_limit or len(d.test), len(d.test)),
                         "step_size": (cfg.pgd_step_size if cfg.pgd_step_size is not None
                                       else f"{PGD.step_scale}*eps/steps"),
                         "random_start": True},
                 "autoattack": {"eps": cfg.autoattack_eps,
                                "test_images": min(cfg.autoattack_limit, len(d.test)),
                                "version": "standard (APGD-CE, APGD-T, FAB-T, Square)"},
                 "parallel_training": {"workers": cfg.workers,
                                       "peak_rss_mb": members_meta.get("peak_rss_mb")},
                 "selection": chosen.to_json(), "voting": voting})
    if distributed.is_main():
        write_report(out, results)
        write_html_report(out)
    distributed.barrier()
    return results
