"""The denial policy's flagged budget and share limit, chosen on validation traffic (never on
the test images the guard benchmarks report).

Traffic on the guard's own calibration split (the held-out training images that ``guard fit``
kept out of the bank, so their kNN scores are those of unseen images):
* 50 honest clients sending 100 distinct images each (all 5,000);
* 100 honest clients sending 5 augmented copies (``bench_guard.augmented``: shift, crop,
  brightness, noise) of 20 images each, as a camera or a retrying app would;
* the white-box attackers of ``bench_guard.py`` (FGSM, PGD-20, the detector's adaptive
  attack) on the first 200 images, one image a request.
Every image is classified and scored once, in-process; then each candidate policy is replayed
over the same verdicts through a real :class:`~advguard.serve.SQLiteStore` (the evidence is
what the kNN score flags, the default). A candidate is admissible when it denies no honest
client; among those, the one that answers the attackers the fewest adversarial images in all
(an attacker never denied counts its 200) is chosen, the smaller budget on a tie.

Run: ``python benchmarks/choose_policy.py GUARD_DIR OUT.json`` (GUARD_DIR: a guard fitted on
MNIST with the default split, e.g. ``advguard guard fit runs/lenet5-mnist.safetensors --out
runs/guard-mnist``).
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_guard import ATTACK_IMAGES, attacks, augmented

from advguard.data import VAL_SIZE, load_data, train_val_split
from advguard.io import write_json
from advguard.serve import Guard, Policy, SQLiteStore

PLAIN_CLIENTS, PLAIN_EACH = 50, 100
DUP_CLIENTS, DUP_IMAGES, DUP_COPIES = 100, 20, 5
BUDGETS = (20, 30, 40, 50, 60, 80)
SHARES = (0.0, 0.5, 0.6, 0.7)  # 0: the share rule off


def flags(guard: Guard, x: torch.Tensor) -> np.ndarray:
    """Which images the kNN score flags (score below the threshold)."""
    out = []
    for i in range(0, len(x), 500):
        v = guard.verdicts(x[i:i + 500])
        out.append(v.scores < v.threshold)
    return np.concatenate(out)


def replay(policy: Policy, streams: dict[str, np.ndarray], folder: Path) -> dict[str, int | None]:
    """For each client's stream of flags (one image a request): how many were answered
    before its denial (None: never denied)."""
    store = SQLiteStore(folder / f"{policy.max_flagged}-{policy.flagged_limit}.db", policy)
    out: dict[str, int | None] = {}
    try:
        for name, stream in streams.items():
            out[name] = None
            for i, f in enumerate(stream.tolist()):
                if not store.admit(name, [f], [0.0 if f else 1.0], now=float(i)).answered:
                    out[name] = i
                    break
    finally:
        store.close()
    return out


def main(guard_dir: Path, out: Path) -> None:
    torch.set_num_threads(1)
    guard = Guard.load(guard_dir)
    full = load_data(guard.config.dataset, "train")
    _, va = train_val_split(len(full), min(VAL_SIZE, len(full) // 5), 0)
    x = torch.stack([full[int(i)][0] for i in va])
    y = torch.tensor([int(full[int(i)][1]) for i in va])
    streams: dict[str, np.ndarray] = {}
    plain = flags(guard, x[:PLAIN_CLIENTS * PLAIN_EACH])
    for k in range(PLAIN_CLIENTS):
        streams[f"honest-{k}"] = plain[k::PLAIN_CLIENTS]
    for k in range(DUP_CLIENTS):  # seeds apart from bench_guard.py's (0 … 99)
        images = x[k * DUP_IMAGES:(k + 1) * DUP_IMAGES]
        streams[f"dup-{k}"] = flags(guard, augmented(images, DUP_COPIES, guard.info.flips,
                                                     1000 + k))
    adv = attacks(guard, x[:ATTACK_IMAGES], y[:ATTACK_IMAGES], guard.info.num_classes)
    attackers = {name: flags(guard, images) for name, images in adv.items()}
    streams.update(attackers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget, share in itertools.product(BUDGETS, SHARES):
            policy = Policy(max_flagged=budget, flagged_limit=share, max_repeats=0)
            got = replay(policy, streams, Path(tmp))
            answered = {a: got[a] for a in attackers}
            rows.append({"max_flagged": budget, "flagged_limit": share,
                         "honest_denied": sum(got[f"honest-{k}"] is not None
                                              for k in range(PLAIN_CLIENTS)),
                         "near_duplicate_denied": sum(got[f"dup-{k}"] is not None
                                                      for k in range(DUP_CLIENTS)),
                         "attackers_answered": answered,
                         "adversarial_answered": sum(ATTACK_IMAGES if n is None else n
                                                     for n in answered.values())})
            print(rows[-1], flush=True)
    ok = [r for r in rows if r["honest_denied"] == 0 and r["near_duplicate_denied"] == 0]
    chosen = min(ok, key=lambda r: (r["adversarial_answered"], r["max_flagged"])) if ok else None
    write_json(out, {
        "guard": str(guard_dir), "validation": f"the guard's calibration split: {len(va):,} "
        "held-out training images", "flag_rates": {
            "honest": float(plain.mean()),
            "near_duplicates": float(np.mean([streams[f"dup-{k}"].mean()
                                              for k in range(DUP_CLIENTS)])),
            **{a: float(f.mean()) for a, f in attackers.items()}},
        "candidates": rows, "chosen": chosen})
    print("chosen:", chosen)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
