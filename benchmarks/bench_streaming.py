"""The same training on the in-memory path and on the streamed ImageFolder path, side by side.

Real CIFAR-10 images written as PNG files (``write_imagefolder.py``, lossless: the folder holds
the same pixels) are trained on twice per setting with the same seed and batch order: once from
the folder (decoded batch by batch, with 0 or 2 DataLoader workers) and once from the same images
held in memory (``materialise`` of the folder, so the order is ImageFolder's). The weights and
test accuracies must agree within float tolerance; the epoch-time ratio streaming / in-memory is
measured interleaved (in-memory, streamed, in-memory, …) so machine noise hits both alike.

Run: ``python benchmarks/write_imagefolder.py runs/cifar-png --train 5000 --test 1000`` then
``python benchmarks/bench_streaming.py runs/cifar-png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import save

from advguard.data import load_folder, materialise
from advguard.models import accuracy, build_model
from advguard.training import StrengthMix, TrainConfig, train


def run(data, workers: int, info, config: TrainConfig, test) -> tuple[float, float, list]:
    torch.manual_seed(0)
    model = build_model("resnet-s", info)
    t0 = time.perf_counter()
    train(model, data, StrengthMix((8 / 255,)), None, config, progress=False, workers=workers)
    seconds = time.perf_counter() - t0
    return seconds, accuracy(model, test.x, test.y), [p.detach().clone()
                                                     for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    folder = load_folder(args.folder, "train")
    memory = materialise(folder)
    test = materialise(load_folder(args.folder, "test"))
    config = TrainConfig(epochs=args.epochs, batch_size=128, device="cpu", seed=0)
    rows: dict[str, dict] = {}
    for workers in (0, 2):
        times: dict[str, list[float]] = {"in_memory": [], "streamed": []}
        results = {}
        for _ in range(args.repeats):
            for name, data in (("in_memory", memory), ("streamed", folder)):
                seconds, acc, weights = run(data, workers if name == "streamed" else 0,
                                            folder.info, config, test)
                times[name].append(seconds)
                results[name] = (acc, weights)
        diff = max(float((a - b).abs().max()) for a, b in zip(results["in_memory"][1],
                                                             results["streamed"][1],
                                                             strict=True))
        rows[f"workers_{workers}"] = {
            "in_memory_s": statistics.median(times["in_memory"]),
            "streamed_s": statistics.median(times["streamed"]),
            "ratio_streamed_to_in_memory": statistics.median(times["streamed"])
            / statistics.median(times["in_memory"]),
            "times": times,
            "test_accuracy_in_memory": results["in_memory"][0],
            "test_accuracy_streamed": results["streamed"][0],
            "max_weight_difference": diff}
        print(f"workers={workers}: {rows[f'workers_{workers}']}")
    path = save("streaming", {
        "what": "resnet-s, one FGSM(8/255)+clean epoch (batch 128) on real CIFAR-10 images: "
                "from the PNG folder vs. the same images in memory, same seed and order",
        "train_images": len(folder), "test_images": len(test), "epochs": args.epochs,
        "repeats": args.repeats, "rows": rows})
    print(path)


if __name__ == "__main__":
    main()
