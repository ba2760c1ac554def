"""Which of an honest camera's frames the flip rule tells flagged, and whether the model's
classes there are right: the cameras of ``bench_honest.py`` (the same scenes and frames, its
``streams``), classified offline by the guard's model.

The service answers a camera's first frame fresh and its later frames, near-copies of it, as
that answer; a frame the model gives another class than the answer it is told is a *flip*,
told flagged (``state.watched``). Offline, this script takes the first frame's class as the
answer every later frame is compared with (the service may also compare a frame with other
earlier frames inside its ball, so the served count can differ a little; with ``--served``
the per-camera flips a ``bench_honest.py`` result recorded are set beside). Reported per kind:

* flips per frame (over the 99 later frames of each camera) and the cameras with any, and
  the flip rate's standard error over the cameras (a camera's frames share one scene: the
  cameras are the samples);
* of the flipped frames, the share whose own class is the scene's true label (the flag lands
  on a right answer the client would have got fresh) and the share whose told class — the
  first frame's — is (the client is told the right class, flagged);
* of the flipping cameras, the share whose unmoved scene the model misclassifies, and the
  mean margin (top softmax minus second) of the flipping and of the other scenes.

    python benchmarks/camera_flips.py --guard-dir runs/guard-cifar10-stab16 \\
        --data-dir DIR --served honest-cifar10-stab16
"""

from __future__ import annotations

import json
from typing import Any

import torch
from bench_honest import CLIENTS, streams
from common import RESULTS, guard_parser, save, standard_error

from advguard.data import load_data
from advguard.serve import Guard

CAMERAS = ("jittering-camera", "fixed-camera")


@torch.no_grad()
def classes(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's classes of ``x`` and their margins (top softmax minus the second)."""
    p = torch.cat([model(b).softmax(1) for b in x.split(100)])
    top = p.topk(2, dim=1).values
    return p.argmax(1), top[:, 0] - top[:, 1]


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
            fill: str, served: list[int] | None) -> dict[str, Any]:
    flips, right_fresh, right_told = [], 0, 0
    wrong_scene, margin_flip, margin_kept = [], [], []
    for i in range(CLIENTS):
        start = (100 * i) % (len(x) - 99)
        frames = torch.cat(streams(x, kind, i, fill))
        pred, _ = classes(model, frames)
        told, label = int(pred[0]), int(y[start])
        flipped = pred[1:] != told
        flips.append(int(flipped.sum()))
        right_fresh += int((pred[1:][flipped] == label).sum())
        right_told += int(flipped.sum()) * int(told == label)
        scene, margin = classes(model, x[start:start + 1])
        if flips[-1]:
            wrong_scene.append(int(scene) != label)
            margin_flip.append(float(margin))
        else:
            margin_kept.append(float(margin))
    n_flipped = sum(flips)
    out: dict[str, Any] = {
        "cameras": CLIENTS, "flips": n_flipped, "flips_per_frame": n_flipped / (CLIENTS * 99),
        "flips_per_frame_se": standard_error([f / 99 for f in flips]),
        "cameras_with_a_flip": sum(f > 0 for f in flips),
        "flipped_frames_right": right_fresh / max(1, n_flipped),
        "flipped_frames_told_right": right_told / max(1, n_flipped),
        "flipping_scenes_misclassified": (sum(wrong_scene) / len(wrong_scene)
                                          if wrong_scene else None),
        "margin_flipping_scenes": (sum(margin_flip) / len(margin_flip) if margin_flip
                                   else None),
        "margin_other_scenes": (sum(margin_kept) / len(margin_kept) if margin_kept
                                else None),
        "flips_by_camera": flips,
    }
    if served is not None:
        both = torch.tensor([flips, served], dtype=torch.float64)
        out["served_flips"] = int(sum(served))
        out["served_cameras_with_a_flip"] = sum(f > 0 for f in served)
        r = float(torch.corrcoef(both)[0, 1])  # NaN where either has no flips at all
        out["offline_served_correlation"] = None if r != r else r
    return out


def main() -> None:
    ap = guard_parser("camera-flips")
    ap.add_argument("--split", default="test", choices=("test", "train"))
    ap.add_argument("--first", type=int, default=100, help="the first image sent")
    ap.add_argument("--kinds", default=",".join(CAMERAS))
    ap.add_argument("--fill", default="zeros", choices=("zeros", "reflect"))
    ap.add_argument("--served", default=None,
                    help="a bench_honest.py result (name under benchmarks/results) whose "
                         "per-camera flips to set beside")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(CAMERAS):  # one scene a client: a first frame to compare with
        ap.error(f"--kinds: cameras only ({', '.join(CAMERAS)})")
    guard = Guard.load(args.guard_dir)
    data = load_data(guard.config.dataset, args.split, data_dir=args.data_dir)
    picked = range(args.first, min(len(data), args.first + 9900))
    x = torch.stack([data[i][0] for i in picked])
    y = torch.tensor([int(data[i][1]) for i in picked])
    served = (json.loads((RESULTS / f"{args.served}.json").read_text())["runs"]
              if args.served else {})
    runs = {}
    for kind in kinds:
        by_client = served.get(kind, {}).get("flips_by_client")
        runs[kind] = measure(guard.model, x, y, kind, args.fill, by_client)
        print(kind, json.dumps({k: v for k, v in runs[kind].items()
                                if k != "flips_by_camera"}), flush=True)
    save(args.out, {"fill": args.fill,
                    "images": (f"{guard.config.dataset} {args.split} images {args.first} - "
                               f"{args.first + len(x) - 1}"), "served": args.served,
                    "runs": runs}, args.guard_dir)


if __name__ == "__main__":
    main()
