"""Per-slice agreement between a streamed audit's pieces (``audit --out X``, X.parts) and the
AutoAttack slices of record (``autoattack-test-NNNNN.json``, 1,000 images each, run apart with
``--test-start``): the counts after every attack of each slice, recomputed from the pieces'
per-image outcomes. Prints one row per slice and whether all agree.

    python benchmarks/compare_slices.py docs/results/mnist-recipes-validation/trades-0.3-34
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from advguard.evaluation import read_run

ATTACKS = ("APGD-CE", "APGD-T", "FAB-T", "Square")


def main(folder: Path, parts: Path) -> int:
    _, outcomes = read_run([parts])
    rows, cols = outcomes.rows, outcomes.columns
    agree, compared = True, 0
    for path in sorted(folder.glob("autoattack-test-*.json")):
        old = json.loads(path.read_text())
        a, n = int(old["test_start"]), int(old["images"])
        inside = (rows >= a) & (rows < a + n)
        if int(inside.sum()) < n:
            print(f"{path.name}: {int(inside.sum())} of {n} images audited so far")
            continue
        compared += 1
        aa = old["autoattack"]
        ours = {k: round(int(cols["AutoAttack " + k][inside].sum())) for k in ATTACKS}
        theirs = {k: round(aa["robust_after"][k] * n) for k in ATTACKS}
        ours["clean"], theirs["clean"] = int(cols["clean"][inside].sum()), round(
            aa["clean_accuracy"] * n)
        same = ours == theirs
        agree &= same
        print(f"{path.name}: {'same' if same else 'DIFFERENT'}  streamed {ours}  "
              f"slice {theirs}")
    print(f"{compared} slices compared: {'all agree' if agree else 'some differ'}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
