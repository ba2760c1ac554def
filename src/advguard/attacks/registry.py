"""Every attack by name, in one place, with the norms it runs in: ``evaluate --attack``'s
choices, the audit's independent attacks and ``reproduce detect``'s crafted negatives are read
from :data:`ATTACKS` (a new attack is its file and one entry here).

A name means the same method in every norm: ``fgsm`` is the one-gradient attack of the norm
(FGSM in L∞, FGM in L2: every strength from one gradient, SPEC A1), ``pgd`` Madry et al.'s PGD
in that ball, and so on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from advguard.attacks.base import Attack
from advguard.attacks.external import TorchattacksAPGD, TorchattacksPGD
from advguard.attacks.fgsm import FGM, FGSM
from advguard.attacks.lbfgs import LBFGS
from advguard.attacks.norms import NORMS
from advguard.attacks.pgd import PGD
from advguard.attacks.random_start import NoiseFGSM, RandomStartFGSM
from advguard.errors import InputError

EVALUATION, TRAINING, INDEPENDENT, MINIMAL = ("evaluation", "training", "independent",
                                              "minimal")


@dataclass(frozen=True)
class Registered:
    """How a registered attack is built in each norm it has (``classes``: norm -> class), with
    ``fixed`` settings; ``roles``: ``evaluation`` (a curve's or an audit's attack, bounded by
    ε), ``training`` (a perturbation to train on, which may leave the ball), ``independent``
    (another library's code: the audit's cross-check), ``minimal`` (finds the smallest
    perturbation, ε unused: L-BFGS); ``label``: its column name in results, formatted with its
    settings and ``tag`` (nothing in L∞, "-L2" in L2); ``as_pgd``: an audit runs it with its
    own PGD's steps, step size and restarts (otherwise at its class's defaults)."""

    classes: Mapping[str, type[Attack]]
    summary: str
    roles: tuple[str, ...] = (EVALUATION,)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    as_pgd: bool = False

    def build(self, norm: str, **settings: Any) -> Attack:
        """The attack in ``norm``; of ``settings``, those its class has (``steps`` goes to a
        PGD, not to FGSM)."""
        cls = self.classes[norm]
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        # a None another attack means as "its own rule" is this one's default instead
        kwargs = {**self.fixed, **{k: v for k, v in settings.items() if k in defaults
                                   and (v is not None or defaults[k] is None)}}
        names = set(defaults)
        if "norm" in names:
            kwargs["norm"] = norm
        return cls(**kwargs)


BOTH = ("linf", "l2")
ATTACKS: dict[str, Registered] = {
    "fgsm": Registered({"linf": FGSM, "l2": FGM}, "the one-gradient attack of the norm: FGSM "
                       "(L∞), FGM (L2); every strength from one gradient"),
    "pgd": Registered({n: PGD for n in BOTH}, "PGD with random start (Madry et al.)"),
    "rs-fgsm": Registered({"linf": RandomStartFGSM}, "FGSM from a random start (Wong et al. "
                          "2020)", roles=(TRAINING,)),
    "n-fgsm": Registered({"linf": NoiseFGSM}, "FGSM with strong noise, unprojected (de Jorge "
                         "et al. 2022)", roles=(TRAINING,)),
    "torchattacks-pgd": Registered({n: TorchattacksPGD for n in BOTH}, "torchattacks' PGD, "
                                   "random restarts", roles=(EVALUATION, INDEPENDENT),
                                   label="torchattacks PGD{tag}-{steps} x{restarts}",
                                   as_pgd=True),
    "apgd-ce": Registered({n: TorchattacksAPGD for n in BOTH}, "torchattacks' APGD, "
                          "cross-entropy (Croce & Hein 2020)", roles=(EVALUATION, INDEPENDENT),
                          fixed={"loss": "ce"}, label="torchattacks APGD{tag}-CE-{steps}"),
    "apgd-dlr": Registered({n: TorchattacksAPGD for n in BOTH}, "torchattacks' APGD, DLR loss",
                           roles=(EVALUATION, INDEPENDENT), fixed={"loss": "dlr"},
                           label="torchattacks APGD{tag}-DLR-{steps}"),
    "lbfgs": Registered({"l2": LBFGS}, "L-BFGS (Szegedy et al. 2014): the smallest targeted "
                        "perturbation, ε unused", roles=(MINIMAL,)),
}


def attack_names(role: str = EVALUATION, norm: str | None = None) -> tuple[str, ...]:
    """The registered attacks with ``role`` (in ``norm``, when given), in registry order."""
    return tuple(n for n, r in ATTACKS.items()
                 if role in r.roles and (norm is None or norm in r.classes))


def build_attack(name: str, norm: str = "linf", **settings: Any) -> Attack:
    """A registered attack in ``norm`` (``linf`` or ``l2``), with the ``settings`` it has."""
    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}")
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; choose one of: {', '.join(NORMS)}")
    entry = ATTACKS[name]
    if norm not in entry.classes:
        raise InputError(f"{name} runs in {' and '.join(entry.classes)} only, not {norm}")
    try:
        return entry.build(norm, **settings)
    except TypeError as exc:
        raise InputError(f"attack {name!r}: {exc}") from None


def in_norm(attack: Attack, norm: str) -> Attack | None:
    """``attack``, of a registered class, with its settings in another ``norm``: the class the
    registry names for that norm (FGSM → FGM; the same class with its ``norm`` changed, as
    PGD); None where no registered attack has both forms."""
    here = attack.threat.name
    for entry in ATTACKS.values():
        if entry.classes.get(here) is not type(attack) or norm not in entry.classes:
            continue
        cls = entry.classes[norm]
        if cls is type(attack):
            return dataclasses.replace(attack, norm=norm)  # type: ignore[type-var]
        names = {f.name for f in dataclasses.fields(cls)} - {"norm"}  # type: ignore[arg-type]
        return cls(norm=norm, **{f.name: getattr(attack, f.name)  # type: ignore[call-arg]
                                 for f in dataclasses.fields(attack) if f.name in names})  # type: ignore[arg-type]
    return None


def attack_label(name: str, attack: Attack, norm: str) -> str:
    """A registered attack's column name in results (its ``label``, or its name)."""
    entry = ATTACKS[name]
    if not entry.label:
        return name
    values = {f.name: getattr(attack, f.name) for f in dataclasses.fields(attack)}  # type: ignore[arg-type]
    return entry.label.format(tag="" if norm == "linf" else "-L2", **values)
