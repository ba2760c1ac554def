"""What a stateful watch cannot stop, on validation images: an attack's first query inside the
ε-ball, sent with nothing beside it. For the guard's held-out training images (its validation
split, as ``choose_policy.py`` reads it; never the test images the benchmarks report), Square's
first query — the image plus a random ±ε stripe per column and channel — is sent once, and
counted: the images the model gets right that it fools, and of them those the detector
trusts (what one query wins against the guard). Beside it, two per-image checks an operator
could add, at the share of honest right images each flags:

* **a stricter detector threshold**: the kNN score's threshold set to keep 98% (the guard's
  default), 95%, 90% or 80% of the right validation images;
* **shift consistency**: the model's class on the image moved by one pixel (down and right,
  edges repeated) must be the one it gives the image (an input transformation check, as
  feature squeezing compares a squeezed input's prediction).

    python benchmarks/one_query_floor.py --guard-dir runs/guard-cifar10-eps --data-dir DIR
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import guard_parser, save, validation_images

from advguard.serve import Guard

IMAGES = 2000


def moved(x: torch.Tensor) -> torch.Tensor:
    """``x`` moved one pixel down and right, edges repeated."""
    h, w = x.shape[-2:]
    return F.pad(x, (1, 1, 1, 1), mode="replicate")[..., :h, :w]


def classes(guard: Guard, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([guard.model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])


def main() -> None:
    ap = guard_parser("one-query-floor")
    ap.add_argument("--eps", type=float, default=None, help="default: the watch's query_eps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    guard = Guard.load(args.guard_dir)
    watch = guard.config.watch()
    eps = args.eps if args.eps is not None else (watch.query_eps if watch else None)
    assert eps is not None, "give --eps (the guard's watch has no query_eps)"
    x, y = validation_images(guard.config.dataset, IMAGES, args.data_dir)
    gen = torch.Generator().manual_seed(0)
    stripes = eps * torch.sign(torch.randn((len(x), x.shape[1], 1, x.shape[3]), generator=gen))
    adv = (x + stripes).clamp(0, 1)
    v, va = guard.verdicts(x), guard.verdicts(adv)
    c0, ca = torch.from_numpy(v.predicted), torch.from_numpy(va.predicted)
    right = c0 == y
    fooled = right & (ca != y)
    s0, sa = torch.from_numpy(v.scores), torch.from_numpy(va.scores)
    u0, ua = (torch.zeros(len(x), dtype=torch.bool) if u is None else torch.from_numpy(u)
              for u in (v.unlike, va.unlike))
    steady0, steady_a = classes(guard, moved(x)) == c0, classes(guard, moved(adv)) == ca
    n_right = int(right.sum())
    rows = {}
    for keep in (0.98, 0.95, 0.9, 0.8):
        threshold = torch.quantile(s0[right].double(), 1 - keep).item()
        trusted0, trusted_a = (s0 >= threshold) & ~u0, (sa >= threshold) & ~ua
        rows[str(keep)] = {
            "right_flagged": 1 - int((trusted0 & right).sum()) / n_right,
            "one_query_fooled_and_trusted": int((fooled & trusted_a).sum()) / n_right,
            "with_shift_consistency": {
                "right_flagged": 1 - int((trusted0 & steady0 & right).sum()) / n_right,
                "one_query_fooled_and_trusted":
                    int((fooled & trusted_a & steady_a).sum()) / n_right}}
        print(keep, rows[str(keep)], flush=True)
    save(args.out, {"guard": str(args.guard_dir), "eps": eps,
                    "images": f"{guard.config.dataset} training images held out of the bank: "
                              f"the first {IMAGES} of the validation split",
                    "right": n_right, "one_query_fooled": int(fooled.sum()),
                    "one_query_fooled_and_trusted": int((fooled & torch.from_numpy(
                        va.trusted)).sum()),
                    "misclassified": int((~right).sum()),
                    "misclassified_trusted": int((~right & torch.from_numpy(v.trusted)).sum()),
                    "keep": rows}, args.guard_dir)


if __name__ == "__main__":
    main()
