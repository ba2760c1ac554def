"""advguard's AutoAttack (torchattacks' four attacks, configured as the standard version) beside
the authors' own code (pyautoattack, a packaging of fra31/auto-attack) on the same model and
images: robust accuracy after each attack, the images on which the two disagree, and the time
each took, side by side in one run.

    python benchmarks/bench_autoattack_reference.py [--images 500] [--cases mnist-linf,...]

Cases: ``mnist-linf`` (the committed TRADES model, ε = 0.3), ``cifar10-linf``,
``cifar10-l2`` and ``cifar10-l2-0.1`` (the committed non-robust ``resnet-s``, ε = 8/255, L2
ε = 0.5 and 0.1). Writes ``benchmarks/results/NAME.json`` (``--name``, default
``autoattack-reference``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import save

from advguard.data import load_dataset
from advguard.evaluation import AutoAttack
from advguard.io import file_sha256
from advguard.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "mnist-linf": ("docs/results/mnist-recipes-validation/trades-0.3-34/model.safetensors",
                   "mnist", 0.3, "linf"),
    "cifar10-linf": ("docs/results/guard-models/resnet-s-cifar10.safetensors", "cifar10",
                     8 / 255, "linf"),
    "cifar10-l2": ("docs/results/guard-models/resnet-s-cifar10.safetensors", "cifar10", 0.5,
                   "l2"),
    # a radius that leaves the non-robust model some robust images: a comparison that can differ
    "cifar10-l2-0.1": ("docs/results/guard-models/resnet-s-cifar10.safetensors", "cifar10",
                       0.1, "l2"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--data-dir", default=None, help="where CIFAR-10 lies (MNIST needs none)")
    ap.add_argument("--name", default="autoattack-reference", help="the result file's name")
    args = ap.parse_args()
    rows = {}
    for case in args.cases.split(","):
        path, dataset, eps, norm = CASES[case]
        model, _ = load_model(ROOT / path)
        test = load_dataset(dataset, "test", limit=args.images,
                            data_dir=None if dataset == "mnist" else args.data_dir)
        row = {"model": path, "model_sha256": file_sha256(ROOT / path), "eps": eps,
               "norm": norm, "images": f"first {args.images} test images"}
        robust = {}
        for impl in ("reference", "torchattacks"):  # the reference first: warm caches favour ours
            start = time.perf_counter()
            result = AutoAttack(norm=norm, implementation=impl, square_alone=False).evaluate(
                model, test.x, test.y, eps, batch_size=500)
            row[impl] = {"seconds": time.perf_counter() - start,
                         "implementation": result.implementation,
                         "clean": result.clean_accuracy, "robust": result.robust_accuracy,
                         "robust_after": result.robust_after}
            robust[impl] = result.robust
        row["images_judged_differently"] = int((robust["reference"] != robust["torchattacks"])
                                               .sum())
        row["time_ratio_ours_to_reference"] = (row["torchattacks"]["seconds"]
                                               / row["reference"]["seconds"])
        rows[case] = row
        print(case, {k: (v if not isinstance(v, dict) else
                         {kk: vv for kk, vv in v.items() if kk != "robust_after"})
                     for k, v in row.items()}, flush=True)
    save(args.name, {"threads": torch.get_num_threads(), "cases": rows,
                                  "command": "python benchmarks/bench_autoattack_reference.py "
                                             f"--images {args.images} --cases {args.cases}"})


if __name__ == "__main__":
    main()
