"""AutoAttack, standard version (Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks"): the reference evaluation of
robustness the field reports, in its L∞ version (the default) or its L2 one (``norm="l2"``:
the same four attacks at the same budgets in the L2 ball, as the authors' ``norm='L2'``).

Two implementations of the four attacks, configured alike:

* ``"reference"`` — the authors' own code (``pyautoattack`` on PyPI, a packaging of
  fra31/auto-attack), each attack built exactly as its standard version builds it;
* ``"torchattacks"`` — torchattacks' maintained port (the default; it has no 45 MB wheel). Its
  own ``AutoAttack`` wrapper leaves APGD, APGD-T and FAB at 10 steps and Square at
  ``resc_schedule=True``; here they run at the published settings below, and
  ``tests/test_autoattack_reference.py`` checks that both implementations give the same robust
  accuracy on a fixed model and slice.

==========  ====================================================  ===========================
attack      budget (the standard version's)                       kind
==========  ====================================================  ===========================
APGD-CE     100 steps, 1 restart, cross-entropy                   white-box, untargeted
APGD-T      100 steps, 1 restart, DLR loss, 9 target classes      white-box, targeted
FAB-T       100 steps, 1 restart, 9 target classes                white-box, minimum-norm
Square      5,000 queries, p_init 0.8, margin loss, no rescaling     black-box (scores only)
==========  ====================================================  ===========================

As in the standard protocol each attack runs only on the examples every earlier one failed on,
and an example counts as robust only if all four fail. Square also runs on every correctly
classified example on its own (``square_alone``): a black-box attack that does better than the
gradient attacks is the sign of a masked gradient (Athalye et al. 2018), and the per-example
worst case then includes it. Every adversarial image is checked against the ε-ball and [0, 1]
and judged by ``model`` itself, not by the attack's own bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advguard.attacks import check_attack_inputs, norm_named
from advguard.batching import batch_slices
from advguard.errors import AdvguardError, InputError
from advguard.models import eval_mode
from advguard.options import check_int

ATTACKS = ("APGD-CE", "APGD-T", "FAB-T", "Square")
GRADIENT_ATTACKS = ATTACKS[:3]
IMPLEMENTATIONS = ("torchattacks", "reference")
# Square beating the gradient attacks by more than this fraction of the images is a signal
SQUARE_MARGIN = 0.002


def _torchattacks() -> Any:
    try:
        import torchattacks
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AdvguardError("AutoAttack needs torchattacks: pip install torchattacks"
                            ) from exc
    return torchattacks


def _reference() -> Any:
    try:
        import pyautoattack
        from pyautoattack import autopgd_base, fab_pt, square
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AdvguardError("the reference AutoAttack needs the authors' code: "
                            "pip install 'advguard[reference]' (pyautoattack)") from exc
    return pyautoattack, autopgd_base, fab_pt, square


@dataclass(frozen=True)
class AutoAttack:
    """The standard AutoAttack at the published budgets (``steps`` and ``queries`` are there
    to make a quick check cheaper; a reported number uses the defaults)."""

    steps: int = 100  # APGD-CE, APGD-T and FAB-T iterations
    queries: int = 5000  # Square
    targets: int = 9  # target classes of APGD-T and FAB-T (all but the true one on 10 classes)
    seed: int = 0
    square_alone: bool = True  # also run Square on every correct example (the masking check)
    implementation: str = "torchattacks"  # or "reference": the authors' code (pyautoattack)
    norm: str = "linf"  # or "l2": the standard L2 version (the same four attacks in the L2 ball)

    def __post_init__(self) -> None:
        for name in ("steps", "queries", "targets"):
            check_int(f"AutoAttack {name}", getattr(self, name))
        norm_named(self.norm)
        if self.implementation not in IMPLEMENTATIONS:
            raise InputError(f"AutoAttack implementation must be one of "
                             f"{', '.join(IMPLEMENTATIONS)}, got {self.implementation!r}")

    @property
    def standard(self) -> bool:
        return (self.steps, self.queries, self.targets) == (100, 5000, 9)

    def version(self) -> str:
        """The implementation and its version, as results record it."""
        if self.implementation == "reference":
            return f"pyautoattack {_reference()[0].__version__} (reference)"
        return f"torchattacks {_torchattacks().__version__}"

    def _attacks(self, model: nn.Module, eps: float, classes: int
                 ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        if classes < 2:
            raise AdvguardError(f"AutoAttack needs a model of at least 2 classes, got {classes}")
        # every class but the true one is a target where there are fewer than `targets` + 1
        targets = min(self.targets, classes - 1)
        if self.implementation == "reference":
            return self._reference_attacks(model, eps, targets)
        ta = _torchattacks()
        n = targets + 1  # torchattacks takes them as "n_classes - 1"
        norm = norm_named(self.norm).torchattacks()
        return {
            "APGD-CE": ta.APGD(model, norm=norm, eps=eps, steps=self.steps, n_restarts=1,
                               seed=self.seed, loss="ce"),
            "APGD-T": ta.APGDT(model, norm=norm, eps=eps, steps=self.steps, n_restarts=1,
                               seed=self.seed, n_classes=n),
            "FAB-T": ta.FAB(model, norm=norm, eps=eps, steps=self.steps, n_restarts=1,
                            seed=self.seed, multi_targeted=True, n_classes=n),
            "Square": ta.Square(model, norm=norm, eps=eps, n_queries=self.queries,
                                n_restarts=1, p_init=0.8, loss="margin", resc_schedule=False,
                                seed=self.seed)}

    def _reference_attacks(self, model: nn.Module, eps: float, targets: int
                           ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The authors' four attacks as their ``version="standard"`` sets them up."""
        _, apgd, fab, square = _reference()
        device = next(model.parameters()).device
        kw: dict[str, Any] = {"norm": norm_named(self.norm).torchattacks(), "eps": eps,
                              "seed": self.seed, "verbose": False, "device": device}
        ce = apgd.APGDAttack(model, n_iter=self.steps, n_restarts=1, loss="ce", eot_iter=1,
                             rho=0.75, **kw)
        t = apgd.APGDAttack_targeted(model, n_iter=self.steps, n_restarts=1, eot_iter=1,
                                     rho=0.75, n_target_classes=targets, **kw)
        fab_t = fab.FABAttack_PT(model, n_iter=self.steps, n_restarts=1, targeted=True,
                                 n_target_classes=targets, **kw)
        sq = square.SquareAttack(model, n_queries=self.queries, p_init=0.8, n_restarts=1,
                                 loss="margin", resc_schedule=False, **kw)
        return {"APGD-CE": ce.perturb, "APGD-T": t.perturb, "FAB-T": fab_t.perturb,
                "Square": sq.perturb}

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                 batch_size: int = 500, device: str | torch.device = "cpu",
                 progress: bool = False) -> AutoAttackResult:
        """Run the four attacks on ``(x, y)`` at strength ``eps`` (in :attr:`norm`); the
        per-attack and worst-case accuracies (and the adversarial images,
        :attr:`AutoAttackResult.adv`)."""
        check_attack_inputs(x, y)
        eps = norm_named(self.norm).check(eps, tuple(x.shape[1:]))
        model = model.to(device)
        adv_all, parts = x.clone(), []
        with eval_mode(model):
            attacks = self.build(model, x[:1].to(device), eps)
            for sl in tqdm(batch_slices(len(x), batch_size), desc=f"AutoAttack ε={eps:g}",
                           disable=not progress, leave=False):
                columns, adv = self.columns(attacks, model, x[sl].to(device),
                                            y[sl].long().to(device), eps)
                parts.append(columns)
                adv_all[sl] = adv.cpu()
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        return self.result(merged, eps, adv_all)

    def build(self, model: nn.Module, example: torch.Tensor, eps: float
              ) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The four attacks for ``model`` (``example``: one input, for the class count)."""
        with torch.no_grad():
            return self._attacks(model, eps, int(model(example).shape[1]))

    def columns(self, attacks: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One batch: per image (CPU bool tensors) whether the model is right on it clean
        (``clean``), after each attack of the sequence (``APGD-CE`` … ``Square``, cumulative)
        and under Square alone (``Square alone``, with :attr:`square_alone`); and the batch's
        adversarial images (clean where no attack fooled). The seeds are per call, so a
        batch's outcome depends on its own images only: batches may run apart, in any order."""
        ok = _correct(model, x, y)
        out, adv = {"clean": ok.cpu()}, x.clone()
        for name in GRADIENT_ATTACKS:
            ok = self._step(attacks[name], model, x, y, eps, ok, adv, self.norm)
            out[name] = ok.cpu()
        if self.square_alone:
            sq = self._step(attacks["Square"], model, x, y, eps, out["clean"].to(x.device),
                            adv, self.norm, only=ok)
            out["Square alone"], out["Square"] = sq.cpu(), (ok & sq).cpu()
        else:
            out["Square"] = self._step(attacks["Square"], model, x, y, eps, ok, adv,
                                       self.norm).cpu()
        return out, adv

    def result(self, columns: dict[str, torch.Tensor], eps: float,
               adv: torch.Tensor | None = None, version: str | None = None) -> AutoAttackResult:
        """The summary of the per-image :meth:`columns` of a whole set (``version``: the
        implementation that made them, default: the installed one)."""
        n = len(columns["clean"])
        if n == 0:
            raise InputError("AutoAttack ran on no images")

        def share(name: str) -> float:
            return int(columns[name].sum()) / n

        gradient = share(GRADIENT_ATTACKS[-1])
        square = share("Square alone") if "Square alone" in columns else None
        result = AutoAttackResult(
            eps=eps, images=n, standard=self.standard, clean_accuracy=share("clean"),
            robust_after={k: share(k) for k in ATTACKS}, robust_accuracy=share("Square"),
            gradient_accuracy=gradient, square_alone_accuracy=square,
            square_only=gradient - share("Square"), implementation=version or self.version(),
            robust=columns["Square"], adv=adv if adv is not None else torch.empty(0))
        result.warnings.extend(masking_warnings(square, gradient, result.square_only))
        return result

    @staticmethod
    def _step(attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: nn.Module,
              x: torch.Tensor, y: torch.Tensor, eps: float, ok: torch.Tensor,
              adv: torch.Tensor, norm: str, only: torch.Tensor | None = None) -> torch.Tensor:
        """Attack the examples still ``ok``; those it fools (inside the ε-ball, judged by
        ``model``) leave ``ok`` and, if in ``only`` (default: all), write their image to
        ``adv``."""
        todo = ok.nonzero().flatten()
        if len(todo) == 0:
            return ok
        xs = x[todo]
        out = norm_named(norm).project(xs, attack(xs, y[todo]).detach().to(xs.device), eps)
        fooled = ~_correct(model, out, y[todo])
        ok = ok.clone()
        ok[todo[fooled]] = False
        keep = fooled if only is None else fooled & only[todo]
        adv[todo[keep]] = out[keep]
        return ok


@dataclass
class AutoAttackResult:
    eps: float
    images: int
    standard: bool  # the published budgets
    clean_accuracy: float
    robust_after: dict[str, float]  # accuracy after each attack of the sequence (cumulative)
    robust_accuracy: float  # after all four: the AutoAttack number
    gradient_accuracy: float  # after APGD-CE, APGD-T and FAB-T
    square_alone_accuracy: float | None  # Square on every correct example on its own
    square_only: float  # fraction of images only Square fooled
    implementation: str  # "torchattacks 3.5.1" or "pyautoattack 0.2.0 (reference)"
    robust: torch.Tensor = field(repr=False)  # (N,) bool, per example
    adv: torch.Tensor = field(repr=False)  # the adversarial images (clean where none fooled)
    warnings: list[str] = field(default_factory=list)

    @property
    def masking_signal(self) -> bool:
        return bool(self.warnings)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["robust"], out["adv"]
        out["attacks"] = list(ATTACKS)
        return out


def masking_warnings(square_alone: float | None, gradient: float,
                      square_only: float) -> list[str]:
    """The gradient-masking signal: Square (black-box) doing better than the gradient
    attacks, alone or on the images they all failed on."""
    if square_alone is not None and square_alone < gradient - SQUARE_MARGIN:
        return [f"Square (black-box) alone leaves {100 * square_alone:.1f}%, below the gradient "
                f"attacks' {100 * gradient:.1f}% (gradient masking?)"]
    if square_only > SQUARE_MARGIN:
        return [f"Square (black-box) fools {100 * square_only:.1f}% of the images that every "
                "gradient attack failed on (gradient masking?)"]
    return []


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y
