"""Robustness audit: is a white-box number real? (Carlini et al. 2019, "On evaluating
adversarial robustness"; Athalye et al. 2018, "Obfuscated gradients give a false sense of
security").

* **Independent attacks** — attacks advguard did not write (torchattacks' PGD with restarts and
  APGD with the cross-entropy and DLR losses, Croce & Hein 2020) next to advguard's own PGD; the
  robust accuracy is the per-example minimum over all of them (an example counts as robust only
  if no attack fools it).
* **Gradient-masking signals** — robust accuracy that *rises* with more PGD steps; a black-box
  transfer attack (crafted on another model) that beats the white-box attack; inputs whose loss
  gradient is exactly zero; an unbounded attack (ε = 1) that does not drive accuracy to ~0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks import PGD, eval_mode
from advguard.attacks.base import check_attack_inputs, check_strengths, input_gradient

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from advguard.errors import AdvguardError

        raise AdvguardError("the independent-attack audit needs torchattacks: "
                            "pip install 'advguard[audit]'") from exc
    return torchattacks


def independent_attacks(steps: int = 40, step_size: float = 0.01, restarts: int = 5,
                        apgd_steps: int = 100, seed: int = 0) -> dict[str, AttackFn]:
    """torchattacks' PGD (``restarts`` independent random starts) and APGD-CE / APGD-DLR."""
    ta = _torchattacks()

    def ta_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        best = x.clone()
        todo = torch.arange(len(x))
        torch.manual_seed(seed)
        for _ in range(restarts):
            attack = ta.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)
            adv = attack(x[todo], y[todo])
            best[todo] = adv
            with torch.no_grad(), eval_mode(model):
                todo = todo[model(adv).argmax(1) == y[todo]]
            if len(todo) == 0:
                break
        return best

    def apgd(loss: str) -> AttackFn:
        def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
            return ta.APGD(model, norm="Linf", eps=eps, steps=apgd_steps, n_restarts=1,
                           seed=seed, loss=loss)(x, y)
        return run

    return {f"torchattacks PGD-{steps} x{restarts}": ta_pgd,
            f"torchattacks APGD-CE-{apgd_steps}": apgd("ce"),
            f"torchattacks APGD-DLR-{apgd_steps}": apgd("dlr")}


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
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             device: str | torch.device) -> torch.Tensor:
    out = []
    with torch.no_grad(), eval_mode(model):
        for s in range(0, len(x), batch_size):
            out.append(model(x[s:s + batch_size].to(device)).argmax(1).cpu()
                        == y[s:s + batch_size])
    return torch.cat(out)


def _attack_batches(attack: AttackFn, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    eps: float, batch_size: int, device: str | torch.device) -> torch.Tensor:
    advs = [attack(model, x[s:s + batch_size].to(device), y[s:s + batch_size].to(device),
                   eps).detach().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(advs)


def _transferred(source: nn.Module, attack: PGD) -> AttackFn:
    """``attack`` crafted on ``source`` whatever model it is asked to attack (black-box)."""
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        return attack.run(source, x, y, eps)
    return run


def audit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
          pgd: PGD = PGD(steps=40, step_size=0.01, restarts=5),
          attacks: dict[str, AttackFn] | None = None, step_sweep: Sequence[int] = (10, 40, 100),
          sources: dict[str, nn.Module] | None = None, batch_size: int = 500,
          device: str | torch.device = "cpu", seed: int = 0,
          progress: bool = False) -> AuditReport:
    """Attack ``model`` on ``(x, y)`` at strength ``eps`` with advguard's ``pgd``, PGD with
    ``step_sweep`` steps (step 2.5·ε/steps) and ``attacks`` (default:
    :func:`independent_attacks` with ``pgd``'s steps, step and restarts), and check the
    gradient-masking signals. ``sources`` are other models whose PGD examples are transferred
    to ``model`` (black-box)."""
    check_attack_inputs(x, y)
    (eps,) = check_strengths(eps)
    model = model.to(device).eval()
    if attacks is None:
        attacks = independent_attacks(pgd.steps, pgd.step_size or 2.5 * eps / pgd.steps,
                                      pgd.restarts, seed=seed)
    robust = _correct(model, x, y, batch_size, device)
    report = AuditReport(eps=eps, images=len(x), clean_accuracy=float(robust.float().mean()),
                         attacks={}, worst_case_accuracy=0.0, steps_sweep={})
    step = "" if pgd.step_size is None else f" step {pgd.step_size:g}"
    every: dict[str, AttackFn] = {
        f"advguard PGD-{pgd.steps}{step} x{pgd.restarts}": pgd,
        **{f"advguard PGD-{n}": PGD(steps=n, seed=seed) for n in step_sweep}, **attacks}
    for name, attack in tqdm(every.items(), desc="audit", disable=not progress, leave=False):
        adv = _attack_batches(attack, model, x, y, eps, batch_size, device)
        if (adv - x).abs().amax() > eps + 1e-5:
            report.warnings.append(f"{name} left the ε-ball; its result is ignored")
            continue
        correct = _correct(model, adv, y, batch_size, device)
        report.attacks[name] = float(correct.float().mean())
        robust &= correct
    report.worst_case_accuracy = float(robust.float().mean())
    report.steps_sweep = {str(n): report.attacks[f"advguard PGD-{n}"] for n in step_sweep}
    white_box = min(report.attacks.values())

    sweep = list(report.steps_sweep.values())
    if any(b > a + 0.01 for a, b in zip(sweep, sweep[1:], strict=False)):
        report.warnings.append("robust accuracy rises with more PGD steps (gradient masking?)")
    for name, source in (sources or {}).items():
        source = source.to(device).eval()
        adv = _attack_batches(_transferred(source, PGD(steps=40, seed=seed)), model, x, y, eps,
                              batch_size, device)
        report.transfer[name] = float(_correct(model, adv, y, batch_size, device).float().mean())
        if report.transfer[name] < white_box - 0.01:
            report.warnings.append(f"transfer from {name} beats the white-box attacks "
                                   "(gradient masking?)")
    zero = 0
    for s in range(0, len(x), batch_size):
        g = input_gradient(model, x[s:s + batch_size].to(device), y[s:s + batch_size].to(device))
        zero += int((g.flatten(1).abs().amax(1) == 0).sum())
    report.zero_gradient_fraction = zero / len(x)
    if report.zero_gradient_fraction > 0.01:
        report.warnings.append(f"{100 * report.zero_gradient_fraction:.1f}% of inputs have an "
                               "exactly zero loss gradient")
    unbounded = _attack_batches(PGD(steps=100, step_size=0.05, seed=seed), model, x, y, 1.0,
                                batch_size, device)
    report.unbounded_accuracy = float(_correct(model, unbounded, y, batch_size,
                                               device).float().mean())
    if report.unbounded_accuracy > 0.05:
        report.warnings.append("an unbounded attack (ε = 1) leaves "
                               f"{100 * report.unbounded_accuracy:.1f}% accuracy "
                               "(gradient masking?)")
    return report
