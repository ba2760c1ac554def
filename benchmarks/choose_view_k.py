"""How many earlier queries inside the pixel view's ball make a detection (``query_view_k``),
chosen on validation traffic: MNIST training images 55,000 on (held out of the guard's bank,
never the test images the benchmarks report), the guard fitted with ``--query-eps 0.3``.

For each k, over HTTP against a served copy of the guard with that k:

* attackers (``bench_blackbox.py --split train --first 55000 --images 50``, a budget of 100
  queries, HopSkipJump 400): Square, Square blinded with ±ε on half the image, Square blinded by
  a crop of up to 2 pixels a side (its queries leave the ball; its cash-ins do not), and
  HopSkipJump — fooled and trusted, and the fresh answers an image got;
* honest clients (``bench_honest.py --split train --first 55000``): 100 clients sending
  distinct digits, 100 fixed cameras, 100 jittering cameras — clients denied, and the share of
  queries taken for an earlier one.

The rule, fixed before the runs: the smallest k (a search inside one ball gets k fresh answers
there) whose distinct validation digits are taken for an earlier one at most 1% of the time
(QPA's bar for similar-but-benign queries is 0.23%, Blacklight's 31.7%) and which denies no
honest client the k of record (5) did not. The distinct clients send 10,000 queries of 5,000
validation digits (each digit twice, by two clients; the second time it is the very same image,
answered as before and no detection), so the rate is counted per distinct digit: the first
summary of these runs divided by all 10,000 queries, halving it, and chose 2.

    python benchmarks/choose_view_k.py --guard-dir runs/guard-mnist-eps 1 5 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import RESULTS

ATTACKS = ("square/guarded,square/guarded/cropped-2,square/guarded/blinded-half-eps,"
           "hopskipjump/guarded")
HONEST = "distinct,fixed-camera,jittering-camera"
LIMIT = 0.01  # distinct validation digits taken for an earlier one, at most


def copy_with(guard_dir: Path, k: int) -> Path:
    """The guard folder with ``query_view_k = k`` (with ``--query-eps`` nothing is calibrated
    for k: the copy is the guard ``guard fit --query-view-k k`` makes)."""
    out = guard_dir.with_name(f"{guard_dir.name}-view{k}")
    out.mkdir(exist_ok=True)
    for name in ("model.safetensors", "detector.safetensors", "keys.json"):
        shutil.copy2(guard_dir / name, out / name)
    config = json.loads((guard_dir / "guard.json").read_text())
    if config["queries"].get("query_eps") is None:
        raise SystemExit("fit the guard with --query-eps: a calibrated view depends on k")
    config["queries"]["query_view_k"] = k
    (out / "guard.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def run(guard: Path, k: int) -> None:
    common = ["--guard-dir", str(guard), "--split", "train", "--first", "55000"]
    subprocess.run([sys.executable, "bench_blackbox.py", *common, "--images", "50", "--budget",
                    "100", "--hsj-budget", "400", "--attacks", "square,hopskipjump", "--only",
                    ATTACKS, "--out", f"view-k/attacks-view{k}"], check=True)
    subprocess.run([sys.executable, "bench_honest.py", *common, "--kinds", HONEST, "--out",
                    f"view-k/honest-view{k}"], check=True)


def summary(ks: list[int]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for k in ks:
        attacks = json.loads((RESULTS / "view-k" / f"attacks-view{k}.json").read_text())["runs"]
        obj = json.loads((RESULTS / "view-k" / f"honest-view{k}.json").read_text())
        honest = obj["runs"]
        first, last = (int(v) for v in obj["images"].split("images ")[1].split(" - "))
        images = last - first + 1  # the distinct kind's 10,000 queries resend these, wrapping
        rows[str(k)] = {
            "attackers": {name: {"fooled": r["fooled_rate"], "fooled_and_trusted": r["evaded_rate"],
                                 "fresh_answers_per_image": round(
                                     (r["queries_answered"] - r["answers_as_before"])
                                     / r["images"], 1)}
                          for name, r in attacks.items()},
            "honest": {kind: {"denied": r["denied"],
                              "taken_for_an_earlier_query": r["detections_per_query"]}
                       for kind, r in honest.items()},
            # a resent image (the same pixels) is answered as it was and is no detection: the
            # rate that counts is per distinct image, not per query
            "distinct_images_taken_for_an_earlier_one": round(
                honest["distinct"]["detections"] / min(images, honest["distinct"]["queries"]),
                4)}
    ok = [k for k in ks if rows[str(k)]["distinct_images_taken_for_an_earlier_one"]
          <= LIMIT and all(rows[str(k)]["honest"][h]["denied"]
                           <= rows.get("5", rows[str(k)])["honest"][h]["denied"]
                           for h in rows[str(k)]["honest"])]
    runs = json.loads((RESULTS / "view-k" / f"attacks-view{ks[0]}.json").read_text())
    rule = __doc__.split("The rule, fixed before the runs: ")[1].split("\n\n")[0]
    return {"model_sha256": runs["model_sha256"], "rule": rule.replace("\n", " "),
            "validation": "MNIST training images 55,000 on", "by_k": rows,
            "chosen": min(ok) if ok else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard-dir", type=Path, default=Path("runs/guard-mnist-eps"))
    parser.add_argument("--summary-only", action="store_true",
                        help="summarise the runs already in benchmarks/results/view-k")
    parser.add_argument("ks", nargs="+", type=int)
    args = parser.parse_args()
    if not args.summary_only:
        for k in args.ks:
            run(copy_with(args.guard_dir, k), k)
    out = summary(args.ks)
    (RESULTS / "view-k-choice.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
