"""Training-loop overhead, side by side in one run on real MNIST.

(a) One mixed-MAT epoch (white-box, S = 3 strengths, full size) with ``advguard.training.train``
    vs. a minimal hand-written PyTorch loop doing exactly the same work (same model, batches,
    one FGSM gradient per batch, clean + 3 copies per step).
(b) FGSM adversarial training against ART's ``AdversarialTrainer``. ART cannot mix clean data
    with several strengths of the same examples, so the work is matched per step instead: every
    step trains on 128 images, 64 clean + 64 FGSM (ε = 0.3) crafted on the model being trained
    (ART: batch 128, ratio 0.5; advguard and the hand-written loop: 64 clean images + their FGSM
    copies). All three take the same number of steps.

Run: ``pip install -e ".[bench]" && python benchmarks/bench_training.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from common import save, summarise, time_interleaved

from advguard.data import load_dataset
from advguard.models import build_model
from advguard.training import StrengthMix, TrainConfig, train

STRENGTHS = (0.1, 0.2, 0.3)


def hand_written_epoch(model, x, y, strengths, batch_size, seed):
    """The minimal PyTorch loop: shuffle, FGSM once per batch, train on clean + copies."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for index in order.split(batch_size):
        xb, yb = x[index], y[index]
        model.eval()
        xg = xb.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg), yb, reduction="sum"), xg)
        sign = grad.sign()
        model.train()
        batch = torch.cat([xb] + [(xb + e * sign).clamp(0, 1) for e in strengths])
        loss = F.cross_entropy(model(batch), yb.repeat(len(strengths) + 1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def art_epoch(model, x, y, eps, batch_size):
    from art.attacks.evasion import FastGradientMethod
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(),
                            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                            input_shape=(1, 28, 28), nb_classes=10, clip_values=(0.0, 1.0))
    attack = FastGradientMethod(clf, eps=eps, batch_size=batch_size)
    AdversarialTrainer(clf, attack, ratio=0.5).fit(x.numpy(), y.numpy(), nb_epochs=1,
                                                   batch_size=batch_size)


def main(train_size: int = 20000, repeats: int = 3) -> dict:
    data = load_dataset("mnist", "train", limit=train_size)
    x, y = data.x, data.y
    results = {}
    for arch in ("mlp3", "lenet5"):
        def fresh():
            torch.manual_seed(0)
            return build_model(arch, "mnist")

        cfg = TrainConfig(epochs=1, batch_size=128)
        times = time_interleaved({
            "hand_written": lambda: hand_written_epoch(fresh(), x, y, STRENGTHS, 128, 0),
            "advguard": lambda: train(fresh(), data, StrengthMix(STRENGTHS), None, cfg,
                                      progress=False),
        }, repeats)
        mixed = summarise(times, "hand_written")

        # (b) matched per step: 64 clean + 64 FGSM images per step, len(x) / 128 steps
        half = data.subset(slice(0, len(x) // 2))
        cfg64 = TrainConfig(epochs=1, batch_size=64)
        times = time_interleaved({
            "hand_written": lambda: hand_written_epoch(fresh(), half.x, half.y, (0.3,), 64, 0),
            "advguard": lambda: train(fresh(), half, StrengthMix((0.3,)), None, cfg64,
                                      progress=False),
            "art": lambda: art_epoch(fresh(), x, y, 0.3, 128),
        }, repeats)
        vs_art = summarise(times, "advguard")
        results[arch] = {"mixed_mat_epoch": mixed, "fgsm_training_vs_art": vs_art}
        print(f"{arch}: mixed-MAT epoch advguard/hand-written = "
              f"{mixed['advguard']['ratio_to_hand_written']:.3f}x; FGSM training: ART is "
              f"{vs_art['art']['ratio_to_advguard']:.2f}x advguard's time "
              f"(hand-written {vs_art['hand_written']['ratio_to_advguard']:.2f}x)")
    path = save("training", {"dataset": "mnist", "train_size": train_size, "repeats": repeats,
                             "strengths": list(STRENGTHS), "results": results,
                             "numpy": np.__version__})
    print(f"written {path}")
    return results


if __name__ == "__main__":
    main()
