"""Robustness audit: is a white-box number real? (Carlini et al. 2019, "On evaluating
adversarial robustness"; Athalye et al. 2018, "Obfuscated gradients give a false sense of
security").

* **Independent attacks** — attacks advguard did not write (torchattacks' PGD with restarts and
  APGD with the cross-entropy and DLR losses, Croce & Hein 2020) next to advguard's own PGD; the
  robust accuracy is the per-example minimum over all of them (an example counts as robust only
  if no attack fools it).
* **AutoAttack** — the standard version at the published budgets
  (:mod:`advguard.evaluation.autoattack`), the reference number; its worst case joins the
  per-example minimum.
* **Gradient-masking signals** — robust accuracy that *rises* with more PGD steps; a black-box
  attack (AutoAttack's Square, or PGD transferred from another model) that beats the white-box
  attacks; inputs whose loss gradient is exactly zero; an unbounded attack (ε = 1) that does not
  drive accuracy to ~0. "No masking signal" is said only when none of them fires.

``suite=False`` runs AutoAttack and the cheap checks only (zero gradients, ε = 1).

Every check is decided image by image (:class:`AuditPlan` gives one batch's per-image columns,
:mod:`advguard.evaluation.outcomes` streams them over any dataset, resumable and across
torchrun ranks); the report is computed from those columns alone.

Each attack's own output is checked against the ε-ball and [0, 1] *before* any projection (an
attack whose step leaves them is reported and its result ignored, not silently clipped), and
the caller's model is left in the mode it came in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import nn

from advguard.attacks import (
    LINF,
    PGD,
    Attack,
    Transferred,
    check_attack_inputs,
    input_gradient,
    norm_named,
)
from advguard.attacks.registry import (
    ATTACKS,
    INDEPENDENT,
    attack_label,
    attack_names,
    build_attack,
)
from advguard.batching import batch_slices
from advguard.errors import InputError
from advguard.evaluation.autoattack import AutoAttack
from advguard.evaluation.outcomes import Columns, Outcomes
from advguard.models import eval_mode

AUDIT_PGD = PGD(steps=40, step_size=0.01, restarts=5)  # advguard's PGD in the audit, by default
AUDIT_STEP_SWEEP = (10, 40, 100)
AA, LEFT, TRANSFER = "AutoAttack ", " left the ball", "transfer from "


def _tag(norm: str) -> str:
    """What an attack's name carries of its norm: nothing in L∞ (the names of record), -L2."""
    return "" if norm_named(norm) is LINF else "-L2"
ZERO, UNBOUNDED = "zero gradient", "unbounded PGD"


def independent_attacks(steps: int = 40, step_size: float = 0.01, restarts: int = 5,
                        seed: int = 0, norm: str = "linf") -> dict[str, Attack]:
    """Every registered independent attack (another library's code: torchattacks' PGD with
    ``restarts`` random starts, APGD-CE, APGD-DLR) in ``norm``, by its column name; those
    configured as the audit's PGD take its ``steps``, ``step_size`` and ``restarts``."""
    out: dict[str, Attack] = {}
    for name in attack_names(INDEPENDENT, norm):
        as_pgd = {"steps": steps, "step_size": step_size, "restarts": restarts} \
            if ATTACKS[name].as_pgd else {}
        attack = build_attack(name, norm, seed=seed, **as_pgd)
        out[attack_label(name, attack, norm)] = attack
    return out


@dataclass
class AuditReport:
    eps: float
    images: int
    clean_accuracy: float
    attacks: dict[str, float]  # accuracy under each attack alone
    worst_case_accuracy: float  # an example is robust only if every attack fails on it
    steps_sweep: dict[str, float]  # advguard PGD accuracy by number of steps
    transfer: dict[str, float] = field(default_factory=dict)  # black-box accuracy by source
    zero_gradient_fraction: float = 0.0
    unbounded_accuracy: float = 0.0  # PGD at ε = 1
    autoattack: dict[str, Any] | None = None  # AutoAttackResult.to_json()
    warnings: list[str] = field(default_factory=list)
    standard_error: float = 0.0  # of the worst-case accuracy, from the number of images

    @property
    def masking_signal(self) -> bool:
        return any("masking" in w or "zero loss gradient" in w for w in self.warnings)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _settings(attack: Attack) -> dict[str, Any]:
    """What a result file records of an attack: its class and settings."""
    kept: dict[str, Any] = {f.name: getattr(attack, f.name) for f in fields(attack)
            if isinstance(getattr(attack, f.name), int | float | str | bool | None)} \
        if is_dataclass(attack) else {}
    return {"class": type(attack).__name__, **kept}


@dataclass(frozen=True)
class AuditPlan:
    """What an audit runs at strength ``eps``: named ``attacks`` (advguard's PGD, the step
    sweep, the independent attacks), ``autoattack``, PGD transferred from ``sources`` and
    the cheap checks. :meth:`batch` decides a batch image by image; :meth:`report` sums."""

    eps: float
    attacks: dict[str, Attack]
    step_sweep: tuple[int, ...]
    sources: dict[str, nn.Module]
    autoattack: AutoAttack
    seed: int = 0
    norm: str = "linf"

    @staticmethod
    def make(eps: float, *, pgd: PGD = AUDIT_PGD, attacks: dict[str, Attack] | None = None,
             step_sweep: Sequence[int] = AUDIT_STEP_SWEEP,
             sources: dict[str, nn.Module] | None = None, autoattack: AutoAttack | None = None,
             suite: bool = True, seed: int = 0, norm: str = "linf") -> AuditPlan:
        """The plan at ``eps`` in ``norm`` (``linf`` or ``l2``: every attack in its ball)."""
        ball = norm_named(norm)
        eps = ball.check(eps)
        if ball is not LINF and pgd.step_size == AUDIT_PGD.step_size:
            pgd = dataclasses.replace(pgd, step_size=None)  # an L∞ step: L2 takes 2.5·ε/steps
        pgd = dataclasses.replace(pgd, norm=ball.name)
        autoattack = dataclasses.replace(autoattack or AutoAttack(seed=seed), norm=ball.name)
        if not suite:
            attacks, step_sweep, sources = {}, (), None
        elif attacks is None:
            attacks = independent_attacks(pgd.steps, pgd.step_size or 2.5 * eps / pgd.steps,
                                          pgd.restarts, seed=seed, norm=ball.name)
        step = "" if pgd.step_size is None else f" step {pgd.step_size:g}"
        tag = _tag(ball.name)
        every: dict[str, Attack] = {
            **({f"advguard PGD{tag}-{pgd.steps}{step} x{pgd.restarts}": pgd} if suite else {}),
            **{f"advguard PGD{tag}-{n}": PGD(steps=n, seed=seed, norm=ball.name)
               for n in step_sweep}, **attacks}
        return AuditPlan(eps, every, tuple(step_sweep), dict(sources or {}), autoattack, seed,
                         ball.name)

    def describe(self) -> dict[str, Any]:
        """The plan as a result's provenance records it (attack settings, implementations)."""
        return {"eps": self.eps, "norm": self.norm, "seed": self.seed,
                "step_sweep": list(self.step_sweep),
                "attacks": {k: _settings(a) for k, a in self.attacks.items()},
                "autoattack": {**asdict(self.autoattack), "version": self.autoattack.version()},
                "transfer_from": sorted(self.sources)}

    def batch(self, model: nn.Module, device: str | torch.device = "cpu"
              ) -> Callable[[torch.Tensor, torch.Tensor], Columns]:
        """``fn(x, y)``: one batch's per-image columns (``model`` in eval mode on ``device``)."""
        built: dict[str, Any] = {}

        def fn(x: torch.Tensor, y: torch.Tensor) -> Columns:
            check_attack_inputs(x, y)
            x, y = x.to(device), y.long().to(device)
            if not built:
                built.update(self.autoattack.build(model, x[:1], self.eps))
            return self._columns(model, x, y, built)

        return fn

    def _columns(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 aa_attacks: dict[str, Any]) -> Columns:
        eps, ball = self.eps, norm_named(self.norm)
        cols: Columns = {"clean": _right(model, x, y)}
        for name, attack in self.attacks.items():
            adv = attack.perturb(model, x, y, eps).detach()  # before any projection
            flat = adv.flatten(1)
            cols[name + LEFT] = (ball.distance(adv, x) > eps + 1e-5) | (flat.amin(1) < 0) | (
                flat.amax(1) > 1)
            cols[name] = _right(model, adv, y)
        aa, _ = self.autoattack.columns(aa_attacks, model, x, y, eps)
        cols.update({AA + k: v for k, v in aa.items() if k != "clean"})
        for name, source in self.sources.items():
            adv = Transferred(source.to(x.device), PGD(steps=40, seed=self.seed,
                                                       norm=ball.name)).craft(model, x, y, eps)
            cols[TRANSFER + name] = _right(model, adv, y)
        cols[ZERO] = input_gradient(model, x, y).flatten(1).abs().amax(1) == 0
        if ball is LINF:
            unbounded = PGD(steps=100, step_size=0.05, seed=self.seed).craft(model, x, y, 1.0)
        else:  # the whole image cube: its diameter
            unbounded = PGD(steps=100, seed=self.seed, norm=ball.name).craft(
                model, x, y, float(x[0].numel()) ** 0.5)
        cols[UNBOUNDED] = _right(model, unbounded, y)
        return {k: v.cpu() for k, v in cols.items()}

    def report(self, outcomes: Outcomes) -> AuditReport:
        """The audit's numbers and warnings from the per-image columns of every image."""
        return summarise(self.describe(), outcomes)


def summarise(plan: dict[str, Any], outcomes: Outcomes) -> AuditReport:
    """The audit's numbers and warnings from the per-image columns of every image, by the plan
    that made them (:meth:`AuditPlan.describe`, as a run's manifest records it)."""
    cols, n, eps = outcomes.columns, len(outcomes), float(plan["eps"])
    if n == 0:
        raise InputError("the audit ran on no images")

    def share(col: torch.Tensor) -> float:
        return int(col.sum()) / n

    robust = cols["clean"].clone()
    report = AuditReport(eps=eps, images=n, clean_accuracy=share(robust),
                         attacks={}, worst_case_accuracy=0.0, steps_sweep={})
    for name in plan["attacks"]:
        if bool(cols[name + LEFT].any()):
            report.warnings.append(f"{name} left the ε-ball or [0, 1]; its result is ignored")
            continue
        report.attacks[name] = share(cols[name])
        robust &= cols[name]
    settings = {k: v for k, v in plan["autoattack"].items() if k != "version"}
    aa = AutoAttack(**settings).result({"clean": cols["clean"], **{
        k[len(AA):]: v for k, v in cols.items() if k.startswith(AA)}}, eps,
        version=plan["autoattack"]["version"])
    report.autoattack = aa.to_json()
    report.attacks[f"AutoAttack ({'standard' if aa.standard else 'reduced budget'})"] = (
        aa.robust_accuracy)
    report.warnings.extend(aa.warnings)
    robust &= aa.robust
    report.worst_case_accuracy = r = share(robust)
    report.standard_error = (r * (1 - r) / n) ** 0.5
    tag = _tag(plan.get("norm", "linf"))
    report.steps_sweep = {str(k): report.attacks[f"advguard PGD{tag}-{k}"] for k in
                          plan["step_sweep"] if f"advguard PGD{tag}-{k}" in report.attacks}
    _masking_checks(report, aa.gradient_accuracy, cols, share)
    return report


def _masking_checks(report: AuditReport, aa_gradient: float, cols: Columns,
                    share: Callable[[torch.Tensor], float]) -> None:
    sweep = list(report.steps_sweep.values())
    if any(b > a + 0.01 for a, b in zip(sweep, sweep[1:], strict=False)):
        report.warnings.append("robust accuracy rises with more PGD steps (gradient masking?)")
    # the gradient attacks' best, which a black-box attack must not beat
    white_box = min([aa_gradient, *(v for k, v in report.attacks.items()
                                    if not k.startswith("AutoAttack"))])
    for name in (k[len(TRANSFER):] for k in cols if k.startswith(TRANSFER)):
        report.transfer[name] = share(cols[TRANSFER + name])
        if report.transfer[name] < white_box - 0.01:
            report.warnings.append(f"transfer from {name} beats the white-box attacks "
                                   "(gradient masking?)")
    report.zero_gradient_fraction = share(cols[ZERO])
    if report.zero_gradient_fraction > 0.01:
        report.warnings.append(f"{100 * report.zero_gradient_fraction:.1f}% of inputs have an "
                               "exactly zero loss gradient")
    report.unbounded_accuracy = share(cols[UNBOUNDED])
    if report.unbounded_accuracy > 0.05:
        report.warnings.append("an unbounded attack (the whole image cube) leaves "
                               f"{100 * report.unbounded_accuracy:.1f}% accuracy "
                               "(gradient masking?)")


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
          pgd: PGD = AUDIT_PGD,
          attacks: dict[str, Attack] | None = None, step_sweep: Sequence[int] = AUDIT_STEP_SWEEP,
          sources: dict[str, nn.Module] | None = None, batch_size: int = 500,
          device: str | torch.device = "cpu", seed: int = 0,
          autoattack: AutoAttack | None = None, suite: bool = True) -> AuditReport:
    """Attack ``model`` on ``(x, y)`` at strength ``eps`` with advguard's ``pgd``, PGD with
    ``step_sweep`` steps (step 2.5·ε/steps) and ``attacks`` (default:
    :func:`independent_attacks` with ``pgd``'s steps, step and restarts), and check the
    gradient-masking signals. ``sources`` are other models whose PGD examples are transferred
    to ``model`` (black-box). ``autoattack`` (default: the standard version, seeded with
    ``seed``) runs too; ``suite=False`` leaves out every attack but AutoAttack. (A dataset of
    any size, resumable: :func:`advguard.evaluation.outcomes.run_shards` with
    :meth:`AuditPlan.batch`.)"""
    check_attack_inputs(x, y)
    plan = AuditPlan.make(eps, pgd=pgd, attacks=attacks, step_sweep=step_sweep,
                          sources=sources, autoattack=autoattack, suite=suite, seed=seed)
    model = model.to(device)
    with eval_mode(model):
        fn = plan.batch(model, device)
        parts = [Outcomes(torch.arange(len(x))[sl], fn(x[sl], y[sl]))
                 for sl in batch_slices(len(x), batch_size)]
    return plan.report(Outcomes.cat(parts))


@torch.no_grad()
def _right(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y
