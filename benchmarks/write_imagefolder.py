"""Write real CIFAR-10 images as an ImageFolder tree (``OUT/train/<class>/…``, ``OUT/test/…``),
for the streaming and memory benchmarks and the end-to-end example: PNG at 32×32 (lossless, the
same pixels as the in-memory dataset), or JPEG upsampled to ``--size`` (e.g. 224, as a folder of
photos would be). Rows are written in the dataset's order; the file name is the row number.

Run: ``python benchmarks/write_imagefolder.py OUT --train 5000 --test 1000 [--size 224 --jpeg]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from advguard.data import load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def write(out: Path, split: str, n: int, size: int | None, jpeg: bool) -> int:
    """``n`` images of ``split`` (repeating the split when ``n`` exceeds it); returns n."""
    data = load_dataset("cifar10", "train" if split == "train" else "test", data_dir=SHARED)
    for c in CLASSES:
        (out / split / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        row = i % len(data)
        pixels = (data.x[row] * 255).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(pixels)
        if size is not None and size != 32:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        path = out / split / CLASSES[int(data.y[row])] / f"{i:06d}.{'jpg' if jpeg else 'png'}"
        img.save(path, quality=90) if jpeg else img.save(path)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=None, help="upsample to SIZE×SIZE")
    parser.add_argument("--jpeg", action="store_true", help="JPEG (quality 90) instead of PNG")
    args = parser.parse_args()
    for split, n in (("train", args.train), ("test", args.test)):
        have = sum(1 for f in (args.out / split).glob("*/*") if f.is_file())
        if have == n:
            print(f"{args.out / split}: {n} images already written, kept")
            continue
        if have > n:
            raise SystemExit(f"{args.out / split} holds {have} images, more than the {n} asked "
                             "for: write into a new folder")
        write(args.out, split, n, args.size, args.jpeg)  # names are row numbers: extends
    print(f"{args.out}: {args.train} training and {args.test} test images")

if __name__ == "__main__":
    main()
