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

Each attack's own output is checked against the ε-ball and [0, 1] *before* any projection (an
attack whose step leaves them is reported and its result ignored, not silently clipped), and
the caller's model is left in the mode it came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks import (
    PGD,
    Attack,
    Strength,
    check_attack_inputs,
    check_strengths,
    input_gradient,
    with_restarts,
)
from advguard.batching import map_batches
from advguard.errors import AdvguardError
from advguard.evaluation.autoattack import AutoAttack
from advguard.models import correct, eval_mode


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AdvguardError("the independent-attack audit needs torchattacks: "
                            "pip install torchattacks") from exc
    return torchattacks


@dataclass(frozen=True)
class TorchattacksPGD(Attack):
    """torchattacks' PGD with ``restarts`` random starts (later ones only where earlier ones
    failed), seeded once per call through torch's global generator as torchattacks expects."""

    steps: int = 40
    step_size: float = 0.01
    restarts: int = 5
    seed: int = 0

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        ta = _torchattacks()
        torch.manual_seed(self.seed)

        def one_start(xs: torch.Tensor, ys: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return ta.PGD(model, eps=float(eps), alpha=self.step_size, steps=self.steps,
                          random_start=True)(xs, ys)

        return with_restarts(model, x, y, self.restarts, one_start)


@dataclass(frozen=True)
class TorchattacksAPGD(Attack):
    """torchattacks' APGD (Croce & Hein 2020) with the ``ce`` or ``dlr`` loss."""

    loss: str = "ce"
    steps: int = 100
    seed: int = 0

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return _torchattacks().APGD(model, norm="Linf", eps=float(eps), steps=self.steps,
                                    n_restarts=1, seed=self.seed, loss=self.loss)(x, y)


def independent_attacks(steps: int = 40, step_size: float = 0.01, restarts: int = 5,
                        apgd_steps: int = 100, seed: int = 0) -> dict[str, Attack]:
    """torchattacks' PGD (``restarts`` independent random starts) and APGD-CE / APGD-DLR."""
    return {f"torchattacks PGD-{steps} x{restarts}": TorchattacksPGD(steps, step_size, restarts,
                                                                      seed),
            f"torchattacks APGD-CE-{apgd_steps}": TorchattacksAPGD("ce", apgd_steps, seed),
            f"torchattacks APGD-DLR-{apgd_steps}": TorchattacksAPGD("dlr", apgd_steps, seed)}


AUDIT_PGD = PGD(steps=40, step_size=0.01, restarts=5)  # advguard's PGD in the audit, by default
AUDIT_STEP_SWEEP = (10, 40, 100)


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

    @property
    def masking_signal(self) -> bool:
        return any("masking" in w or "zero loss gradient" in w for w in self.warnings)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Transferred(Attack):
    """``attack`` crafted on ``source`` whatever model it is asked to attack (black-box)."""

    source: nn.Module
    attack: Attack

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: Strength) -> torch.Tensor:
        return self.attack.craft(self.source, x, y, eps)


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
          pgd: PGD = AUDIT_PGD,
          attacks: dict[str, Attack] | None = None, step_sweep: Sequence[int] = AUDIT_STEP_SWEEP,
          sources: dict[str, nn.Module] | None = None, batch_size: int = 500,
          device: str | torch.device = "cpu", seed: int = 0,
          autoattack: AutoAttack | None = None, suite: bool = True,
          progress: bool = False) -> AuditReport:
    """Attack ``model`` on ``(x, y)`` at strength ``eps`` with advguard's ``pgd``, PGD with
    ``step_sweep`` steps (step 2.5·ε/steps) and ``attacks`` (default:
    :func:`independent_attacks` with ``pgd``'s steps, step and restarts), and check the
    gradient-masking signals. ``sources`` are other models whose PGD examples are transferred
    to ``model`` (black-box). ``autoattack`` (default: the standard version, seeded with
    ``seed``) runs too; ``suite=False`` leaves out every attack but AutoAttack."""
    check_attack_inputs(x, y)
    (eps,) = check_strengths(eps)
    model = model.to(device)
    with eval_mode(model):
        return _audit(model, x, y, eps, pgd, attacks, step_sweep, sources, batch_size, device,
                      seed, autoattack, suite, progress)


def _raw(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         batch_size: int, device: str | torch.device) -> torch.Tensor:
    """The attack's own output (its :meth:`~Attack.perturb`), before the base class projects
    it, so that an attack leaving the ε-ball can be caught."""
    return map_batches(lambda xb, yb: attack.perturb(model, xb, yb, eps).detach(), x, y,
                       batch_size=batch_size, device=device)


def _audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, pgd: PGD,
           attacks: dict[str, Attack] | None, step_sweep: Sequence[int],
           sources: dict[str, nn.Module] | None, batch_size: int,
           device: str | torch.device, seed: int, autoattack: AutoAttack | None, suite: bool,
           progress: bool) -> AuditReport:
    autoattack = autoattack or AutoAttack(seed=seed)
    if not suite:
        attacks, step_sweep, sources = {}, (), None
    elif attacks is None:
        attacks = independent_attacks(pgd.steps, pgd.step_size or 2.5 * eps / pgd.steps,
                                      pgd.restarts, seed=seed)
    kw: dict[str, Any] = {"batch_size": batch_size, "device": device}
    robust = correct(model, x, y, **kw)
    report = AuditReport(eps=eps, images=len(x), clean_accuracy=int(robust.sum()) / len(x),
                         attacks={}, worst_case_accuracy=0.0, steps_sweep={})
    step = "" if pgd.step_size is None else f" step {pgd.step_size:g}"
    every: dict[str, Attack] = {
        **({f"advguard PGD-{pgd.steps}{step} x{pgd.restarts}": pgd} if suite else {}),
        **{f"advguard PGD-{n}": PGD(steps=n, seed=seed) for n in step_sweep}, **attacks}
    for name, attack in tqdm(every.items(), desc="audit", disable=not progress, leave=False):
        adv = _raw(attack, model, x, y, eps, batch_size, device)
        if (adv - x).abs().amax() > eps + 1e-5 or adv.amin() < 0 or adv.amax() > 1:
            report.warnings.append(f"{name} left the ε-ball or [0, 1]; its result is ignored")
            continue
        ok = correct(model, adv, y, **kw)
        report.attacks[name] = int(ok.sum()) / len(x)
        robust &= ok
    aa = autoattack.evaluate(model, x, y, eps, batch_size=batch_size, device=device,
                             progress=progress)
    report.autoattack = aa.to_json()
    report.attacks[f"AutoAttack ({'standard' if aa.standard else 'reduced budget'})"] = (
        aa.robust_accuracy)
    report.warnings.extend(aa.warnings)
    robust &= aa.robust
    report.worst_case_accuracy = int(robust.sum()) / len(x)
    report.steps_sweep = {str(n): report.attacks[f"advguard PGD-{n}"] for n in step_sweep}
    # the gradient attacks' best, which a black-box attack must not beat
    white_box = min([aa.gradient_accuracy, *(v for k, v in report.attacks.items()
                                             if not k.startswith("AutoAttack"))])

    sweep = list(report.steps_sweep.values())
    if any(b > a + 0.01 for a, b in zip(sweep, sweep[1:], strict=False)):
        report.warnings.append("robust accuracy rises with more PGD steps (gradient masking?)")
    for name, source in (sources or {}).items():
        source = source.to(device)
        adv = Transferred(source, PGD(steps=40, seed=seed)).craft_dataset(
            model, x, y, eps, batch_size=batch_size, device=device)
        report.transfer[name] = float(correct(model, adv, y, **kw).float().mean())
        if report.transfer[name] < white_box - 0.01:
            report.warnings.append(f"transfer from {name} beats the white-box attacks "
                                   "(gradient masking?)")
    zero = map_batches(lambda xb, yb: input_gradient(model, xb, yb).flatten(1).abs().amax(1) == 0,
                       x, y, **kw)
    report.zero_gradient_fraction = int(zero.sum()) / len(x)
    if report.zero_gradient_fraction > 0.01:
        report.warnings.append(f"{100 * report.zero_gradient_fraction:.1f}% of inputs have an "
                               "exactly zero loss gradient")
    unbounded = PGD(steps=100, step_size=0.05, seed=seed).craft_dataset(
        model, x, y, 1.0, batch_size=batch_size, device=device)
    report.unbounded_accuracy = float(correct(model, unbounded, y, **kw).float().mean())
    if report.unbounded_accuracy > 0.05:
        report.warnings.append("an unbounded attack (ε = 1) leaves "
                               f"{100 * report.unbounded_accuracy:.1f}% accuracy "
                               "(gradient masking?)")
    return report
