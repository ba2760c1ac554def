"""Can one comparison of two queries tell a moved copy of an image from another image? For 200
MNIST validation digits (training images 55,000 on, held out of the guard's bank): the distance
from each digit to a copy shifted by up to 2 pixels, or cropped by up to 2 pixels a side and
resized back (with and without noise of ±ε), beside the distance to the nearest of 800 other
validation digits — in the watch's pixel view (L∞), pooled views (L∞ of 4×4 and 7×7 means), the
watch's projection (L2 of the centred unit-length image) and the detector's deep features (L2
of the normalised layer the guard reads). A view where moved copies lie nearer than other
images could catch query blinding by moves; the numbers say none does.

    python benchmarks/moved_copies.py --guard-dir runs/guard-mnist-eps
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from common import save

from advguard.data import load_data
from advguard.detection.features import extract_features
from advguard.serve import Guard

EPS = 0.3


def crop(image: torch.Tensor, gen: torch.Generator, most: int = 2) -> torch.Tensor:
    h, w = image.shape[-2:]
    t, b, left, r = (int(v) for v in torch.randint(0, most + 1, (4,), generator=gen))
    return F.interpolate(image[None, :, t:h - b, left:w - r], size=(h, w), mode="bilinear",
                         align_corners=False)[0]


def shift(image: torch.Tensor, gen: torch.Generator, most: int = 2) -> torch.Tensor:
    h, w = image.shape[-2:]
    dy, dx = (int(v) for v in torch.randint(0, 2 * most + 1, (2,), generator=gen))
    padded = F.pad(image[None], (most,) * 4, mode="replicate")
    return padded[0, :, dy:dy + h, dx:dx + w]


def noise(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (image + (torch.rand(image.shape, generator=gen) * 2 - 1) * EPS).clamp(0, 1)


def views(guard: Guard) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]]:
    """name -> (the view, the norm its distance takes)."""
    def unit(a: torch.Tensor) -> torch.Tensor:
        a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
        return a / a.norm(dim=1, keepdim=True)

    def deep(a: torch.Tensor) -> torch.Tensor:
        f, _ = extract_features(guard.model, a, guard.detector.layers_[0], batch_size=256)
        f = torch.as_tensor(np.asarray(f))
        return f / f.norm(dim=1, keepdim=True)

    inf = float("inf")
    return {"pixel view (L∞)": (lambda a: a.flatten(1), inf),
            "4×4 means (L∞)": (lambda a: F.avg_pool2d(a, 4).flatten(1), inf),
            "7×7 means (L∞)": (lambda a: F.avg_pool2d(a, 7).flatten(1), inf),
            "projection's image (L2)": (unit, 2.0), "deep features (L2)": (deep, 2.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist-eps"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    guard = Guard.load(args.guard_dir)
    train = load_data(guard.config.dataset, "train", data_dir=args.data_dir)
    x = torch.stack([train[i][0] for i in range(55_000, 56_000)])
    base, others = x[:200], x[200:]
    gen = torch.Generator().manual_seed(0)
    moved = {"shifted": torch.stack([shift(b, gen) for b in base]),
             "cropped": torch.stack([crop(b, gen) for b in base]),
             "shifted, noise ±ε": torch.stack([noise(shift(b, gen), gen) for b in base]),
             "cropped, noise ±ε": torch.stack([noise(crop(b, gen), gen) for b in base]),
             "noise ±ε (stays in the ball)": torch.stack([noise(b, gen) for b in base])}
    out: dict[str, Any] = {}
    for name, (view, p) in views(guard).items():
        vb = view(base)
        nearest = torch.cdist(vb, view(others), p=p).min(1).values
        row = {"nearest_other_digit_median": round(float(nearest.median()), 3),
               "nearest_other_digit_q05": round(float(nearest.quantile(0.05)), 3)}
        for kind, xm in moved.items():
            d = (view(xm) - vb).norm(p=p, dim=1)
            row[f"{kind}_median"] = round(float(d.median()), 3)
            row[f"{kind}_nearer_than_nearest_other"] = round(float((d < nearest).float().mean()), 3)
        out[name] = row
        print(name, row, flush=True)
    save("moved-copies", {"images": "MNIST training images 55,000–55,199 (moved) and "
                                    "55,200–55,999 (the others)", "eps": EPS, "views": out},
         args.guard_dir)


if __name__ == "__main__":
    main()
