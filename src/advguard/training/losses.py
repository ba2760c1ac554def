"""The adversarial-training losses that pair each clean image with its adversarial copy.

* TRADES (Zhang et al. 2019): ``CE(f(x), y) + β · KL(f(x) ‖ f(x′)) / N``.
* MART (Wang et al. 2020, "Improving adversarial robustness requires revisiting misclassified
  examples"): ``BCE(f(x′), y) + β · Σᵢ KL(f(xᵢ) ‖ f(x′ᵢ)) · (1 − f_y(xᵢ)) / N``, the boosted
  cross-entropy ``BCE(p, y) = −log p_y − log(1 − max_{k≠y} p_k)`` on the adversarial copy (it
  also pushes the strongest wrong class down), and the KL weighted by how *mis*classified the
  clean image is — the clean images the model gets wrong weigh most.
* Stability training (Zheng et al. 2016): any of them ``+ α · KL(f(x) ‖ f(x̃)) / N``, ``x̃`` a
  near-copy of each clean image (:func:`advguard.data.near_copy`) — the model pulled to give a
  scene's moved, noisy frames the answer it gives the scene.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from advguard.attacks import trades_kl

EPS = 1e-12  # keeps the logarithms finite where a probability reaches 0 or 1


def trades_loss(clean: torch.Tensor, adversarial: torch.Tensor, y: torch.Tensor, beta: float,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """TRADES from the logits of the clean images and of their adversarial copies."""
    return (F.cross_entropy(clean, y, label_smoothing=label_smoothing)
            + beta * trades_kl(adversarial, clean) / len(y))


def mart_loss(clean: torch.Tensor, adversarial: torch.Tensor, y: torch.Tensor,
              beta: float) -> torch.Tensor:
    """MART from the logits of the clean images and of their adversarial copies."""
    p_adv = F.softmax(adversarial, dim=1)
    wrong = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), -1.0).max(1).values
    boosted = F.cross_entropy(adversarial, y) - torch.log(1 - wrong + EPS).mean()
    p_clean = F.softmax(clean, dim=1)
    kl = (p_clean * (torch.log(p_clean + EPS) - torch.log(p_adv + EPS))).sum(1)
    misclassified = 1 - p_clean.gather(1, y[:, None]).squeeze(1)
    return boosted + beta * (kl * misclassified).mean()


def batch_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, xb: torch.Tensor,
               yb: torch.Tensor, *, trades_beta: float = 0.0, mart_beta: float = 0.0,
               adversarial: bool = True, label_smoothing: float = 0.0,
               near: torch.Tensor | None = None, stability: float = 0.0,
               clean_first: bool = False) -> torch.Tensor:
    """The recipe's loss of one step: TRADES or MART on the clean images ``x`` and their
    copies ``xb`` (one each, in order) when the recipe pairs them and there are adversarial
    copies, else cross-entropy on the mixed batch ``(xb, yb)``; with ``stability`` > 0, plus
    ``stability`` times the mean KL divergence of the near-copies ``near`` (one per clean
    image) from their images. ``clean_first``: the mixed batch begins with ``x`` itself (a
    recipe that keeps the clean copy, or clean training), whose outputs the KL then reuses."""
    near = near if stability > 0 else None
    if (trades_beta or mart_beta) and adversarial:
        clean, adv = net(x), net(xb)
        loss = (trades_loss(clean, adv, y, trades_beta, label_smoothing) if trades_beta
                else mart_loss(clean, adv, y, mart_beta))
        return loss if near is None else loss + stability * trades_kl(net(near), clean) / len(y)
    if near is None:
        return F.cross_entropy(net(xb), yb, label_smoothing=label_smoothing)
    if clean_first:
        mixed, moved = net(torch.cat([xb, near])).split([len(xb), len(x)])
        clean = mixed[:len(x)]
    else:
        mixed, clean, moved = net(torch.cat([xb, x, near])).split([len(xb), len(x), len(x)])
    return (F.cross_entropy(mixed, yb, label_smoothing=label_smoothing)
            + stability * trades_kl(moved, clean) / len(x))
