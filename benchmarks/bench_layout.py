"""Channels-last (NHWC) vs. the default layout for CIFAR-10 training, side by side in one run.

The same ``resnet-s`` victim (fresh weights each time), the same 2,000 real CIFAR-10 training
images, one epoch of clean training with crop/flip augmentation, interleaved repeats; the
only difference is ``TrainConfig.channels_last``.

Run: ``python benchmarks/bench_layout.py [CIFAR-10 folder]`` (default: ``shared/data/cifar-10``
beside the project root).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import save, summarise, time_interleaved

from advguard.data import load_dataset
from advguard.models import build_model
from advguard.training import StrengthMix, TrainConfig, train

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"


def main(data_dir: str = str(CIFAR), images: int = 2000, repeats: int = 3) -> dict:
    data = load_dataset("cifar10", "train", data_dir=data_dir, limit=images)

    def epoch(channels_last: bool) -> None:
        torch.manual_seed(0)
        model = build_model("resnet-s", "cifar10")
        train(model, data, StrengthMix(), None,
              TrainConfig(epochs=1, batch_size=128, augment=True, channels_last=channels_last),
              progress=False)

    times = time_interleaved({"default (NCHW)": lambda: epoch(False),
                              "channels-last (NHWC)": lambda: epoch(True)}, repeats)
    summary = summarise(times, "default (NCHW)")
    for name, row in summary.items():
        print(f"{name:<22} {row['median_s']:6.2f} s  = {row['ratio_to_default (NCHW)']:.3f}x")
    path = save("layout", {"dataset": "cifar10", "model": "resnet-s", "images": images,
                           "repeats": repeats, "results": summary})
    print(f"written {path}")
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:2])
