"""The MAT experiment's trained methods (SPEC A3) and their evaluation (A6): each method's model,
parallel MAT's members and voting units, and the curves under the three threat settings."""

from __future__ import annotations

import functools
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from advguard.ensemble import VotingEnsemble, VotingRule, fit_voting, train_parallel
from advguard.evaluation import (
    AutoAttack,
    ThreatSetting,
    curve_from_directions,
    fgsm_curve,
    grid_mean,
    pgd_curve,
)
from advguard.models import build_model
from advguard.reports import MethodResult
from advguard.reproduce.mat.config import MixedSize
from advguard.reproduce.mat.stages import (
    Mat,
    directions,
    selection,
    source,
    train_config,
    voting_data,
)
from advguard.training import Method, RecipeName, get_recipe, train

PARALLEL_MEMBERS = "parallel-members"
VOTING_COMPARISON_PGD_IMAGES = 1000  # PGD test images of the voting-rule comparison, at most


def method_strengths(m: Mat, method: Method) -> list[float]:
    if method is Method.ORIGINAL:
        return []
    if method is Method.PGD_AT:  # Madry et al. train at the top of the range
        return [max(m.cfg.grid)]
    sel = selection(m)
    return list({Method.SINGLE: sel.single, Method.MIXED: sel.mixed,
                 Method.PARALLEL: sel.parallel}[method])


def members(m: Mat) -> tuple[VotingEnsemble, dict[str, Any]]:
    """Parallel MAT's members, trained once (mean vote) and shared by every voting rule."""
    c, d = m.cfg, m.data

    def compute() -> tuple[VotingEnsemble, dict[str, Any]]:
        strengths = method_strengths(m, Method.PARALLEL)
        mix = get_recipe(c.recipe).mix(strengths[:1])
        base, res = train_parallel(
            functools.partial(build_model, c.victim, c.dataset), d.train, strengths,
            source(m, c.recipe), train_config(c, c.recipe), val=d.val, state_dir=m.run.ckpt,
            progress=m.progress, workers=c.workers, clean=mix.clean)
        return base, {"arch": c.victim, "dataset": c.dataset, "strengths": strengths,
                      "train_seconds": sum(r.seconds for r in res.members),
                      "history": [r.history for r in res.members],
                      "peak_rss_mb": res.peak_rss_mb, "workers": c.workers}

    n = len(method_strengths(m, Method.PARALLEL))
    return m.run.ensemble(PARALLEL_MEMBERS, compute,
                          cleanup=[f"parallel-{k}.state.pt" for k in range(n)])


def ensemble(m: Mat, rule: VotingRule) -> tuple[VotingEnsemble, float]:
    """Parallel MAT with voting ``rule`` and its members' training wall time."""
    base, meta = members(m)
    seconds = float(meta["train_seconds"])
    if rule is VotingRule.MEAN:
        return base, seconds

    def compute() -> tuple[VotingEnsemble, dict[str, Any]]:
        c = m.cfg
        ens = VotingEnsemble(list(base.members), rule=rule, num_classes=c.info.num_classes)
        x, y = voting_data(m, base)
        losses = fit_voting(ens, x, y, epochs=c.voting_epochs, seed=c.seed, device=c.device)
        return ens.eval(), {"arch": c.victim, "dataset": c.dataset,
                            "strengths": method_strengths(m, Method.PARALLEL),
                            "train_seconds": seconds, "voting_losses": losses}

    return m.run.ensemble(f"parallel-{rule.value}", compute)[0], seconds


def model(m: Mat, method: Method) -> tuple[nn.Module, float]:
    """The trained model of ``method`` and its training wall time (trained if missing)."""
    if method is Method.PARALLEL:
        return ensemble(m, m.cfg.voting)
    c, d = m.cfg, m.data
    recipe = RecipeName.PGD_AT if method is Method.PGD_AT else c.recipe
    state = f"{method.value}.state.pt"

    def compute() -> tuple[nn.Module, dict[str, Any]]:
        strengths = method_strengths(m, method)
        torch.manual_seed(c.seed)
        net = build_model(c.victim, c.dataset)
        reduced = method is Method.MIXED and c.mixed_size is MixedSize.REDUCED
        result = train(net, d.train, get_recipe(recipe).mix(strengths, reduced=reduced),
                       source(m, recipe), train_config(c, recipe), val=d.val,
                       state_path=m.run.path(state), progress=m.progress, desc=method.value)
        return net, {"arch": c.victim, "dataset": c.dataset, "strengths": strengths,
                     "train_seconds": result.seconds, "history": result.history,
                     "recipe": recipe.value}

    net, meta = m.run.model(method.value, compute, cleanup=[state])
    return net, float(meta["train_seconds"])


def curves(m: Mat, net: nn.Module, name: str, pgd_limit: int | None) -> dict[str, list[float]]:
    """``net``'s curves under the three threat settings on the test set."""
    c, test = m.cfg, m.data.test
    net.to(c.device)
    kw: dict[str, Any] = {"device": c.device, "progress": m.progress}
    grid = list(c.grid)
    return {
        ThreatSetting.TRANSFER_FGSM.value: curve_from_directions(
            net, test.x, test.y, directions(m, "test"), grid, desc=f"{name} transfer", **kw),
        ThreatSetting.WHITE_BOX_FGSM.value: fgsm_curve(net, test.x, test.y, grid, **kw),
        ThreatSetting.WHITE_BOX_PGD.value: pgd_curve(
            net, test.x[:pgd_limit], test.y[:pgd_limit], grid, c.evaluation_pgd(),
            desc=f"{name} PGD-{c.pgd_steps}", **kw),
    }


def autoattack(m: Mat, net: nn.Module) -> dict[str, Any] | None:
    """AutoAttack (standard) at the target strength on the first test images (the column
    beside the PGD curve); ``None`` when switched off."""
    c, test = m.cfg, m.data.test
    if c.autoattack_limit == 0:
        return None
    n = min(c.autoattack_limit, len(test))
    result = AutoAttack(seed=c.seed).evaluate(net, test.x[:n], test.y[:n], c.autoattack_eps,
                                              device=c.device, progress=m.progress)
    return result.to_json()


def primary_attack(m: Mat) -> ThreatSetting:
    return ThreatSetting.TRANSFER_FGSM if m.cfg.transfer else ThreatSetting.WHITE_BOX_FGSM


def evaluate(m: Mat, method: Method) -> MethodResult:
    """Curves of ``method`` under the three threat settings (cached per method)."""
    def compute() -> dict[str, Any]:
        net, seconds = model(m, method)
        cv = curves(m, net, method.value, m.cfg.pgd_limit)
        primary = cv[primary_attack(m).value]
        return asdict(MethodResult(curve=primary, mean=grid_mean(primary),
                                   strengths=method_strengths(m, method), curves=cv,
                                   means={k: grid_mean(v) for k, v in cv.items()},
                                   train_seconds=seconds, autoattack=autoattack(m, net)))
    # the stages it needs first, on every rank (a rank-0-only stage may not start collectives)
    model(m, method)
    directions(m, "test")
    return MethodResult(**m.run.json(f"eval-{method.value}", compute, who="main"))


def voting_comparison(m: Mat) -> dict[str, Any]:
    """Every voting rule on the same members: grid means under the three attacks (PGD on at
    most the first 1,000 test images), and the learned weights."""
    def compute() -> dict[str, Any]:
        limit = min(m.cfg.pgd_limit or VOTING_COMPARISON_PGD_IMAGES,
                    VOTING_COMPARISON_PGD_IMAGES)
        out: dict[str, Any] = {"pgd_test_images": min(limit, len(m.data.test))}
        for rule in VotingRule:
            ens, _ = ensemble(m, rule)
            cv = curves(m, ens, f"parallel[{rule.value}]", limit)
            out[rule.value] = {"means": {k: grid_mean(v) for k, v in cv.items()}, "curves": cv}
            if rule is VotingRule.LEARNED:
                out[rule.value]["weights"] = ens.logits.detach().softmax(0).tolist()
        return out
    for rule in VotingRule:  # every ranks fits them first (see evaluate)
        ensemble(m, rule)
    directions(m, "test")
    return dict(m.run.json("eval-voting", compute, who="main"))
