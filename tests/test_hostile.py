"""Hostile input, as a careless or malicious user gives it: every row is refused with exit
status 2 and one ``error: …`` line (CLI) or an :class:`InputError` (API) — no traceback, no
silent wrong number, no work done first, nothing of the user's lost.

The tables are the contract; RESULTS.md quotes how many rows they hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from advguard.attacks import FGSM, LBFGS, PGD, fgsm
from advguard.data import load_dataset
from advguard.data.images import images_from_array
from advguard.detection import KNNDetector
from advguard.errors import AdvguardError, InputError
from advguard.io import save_tensors
from advguard.models import build_model, save_model
from advguard.strengths import exhaustive_select, random_walk_select
from advguard.training import StrengthMix, TrainConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A model, malformed ensembles, image files of every wrong kind, malformed matrices."""
    d = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    net = build_model("mlp3", "mnist")
    save_model(d / "mlp.safetensors", net, arch="mlp3", dataset="mnist")
    weights = {f"members.0.{k}": v for k, v in net.state_dict().items()}
    for name, meta in {"no-arch": {"members": 1, "dataset": "mnist"},
                       "members-abc": {"members": "abc", "arch": "mlp3", "dataset": "mnist"},
                       "members-huge": {"members": 10 ** 9, "arch": "mlp3", "dataset": "mnist"},
                       "dataset-number": {"arch": "mlp3", "dataset": 5}}.items():
        save_tensors(d / f"{name}.safetensors", weights, meta)
    good = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    np.savez(d / "x.npz", x=good)
    np.save(d / "strings.npy", np.array(["a", "b"]))
    np.save(d / "structured.npy", np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(d / "uint8.npy", (good * 255).astype(np.uint8))
    np.save(d / "float64-big-endian.npy", good.astype(">f8"))
    np.save(d / "nan.npy", np.full_like(good, np.nan))
    np.save(d / "3d.npy", good[:, 0])
    np.save(d / "rgb.npy", good.repeat(3, axis=1))
    (d / "empty.npy").write_bytes(b"")
    (d / "text.npy").write_text("0.1, 0.2, 0.3\n")
    (d / "truncated.npy").write_bytes((d / "strings.npy").read_bytes()[:90])
    for name, matrix in {"bare": 0.5, "ragged": [[0.9, 0.5], [0.6]],
                         "strings": [["a", "b"], ["c", "d"]], "nan": [[0.9, None], [0.5, 0.9]],
                         "rectangular": [[0.9, 0.5]], "list": None}.items():
        (d / f"matrix-{name}.json").write_text(json.dumps({"matrix": matrix} if matrix is not None
                                                          else [[0.9, 0.5], [0.5, 0.9]]))
    (d / "a-directory").mkdir()
    (d / "a-file").write_text("x")
    return d


# (id, command line with {d} the fixture folder, part of the one error line)
CLI_ROWS = [
    # silent wrong robustness numbers before
    ("evaluate-pgd-restarts-0", "evaluate {d}/mlp.safetensors --attack white-box-pgd "
     "--pgd-restarts 0", "restarts must be an integer ≥ 1"),
    ("evaluate-pgd-steps-negative", "evaluate {d}/mlp.safetensors --attack white-box-pgd "
     "--pgd-steps -1", "steps must be an integer ≥ 1"),
    ("evaluate-pgd-steps-0", "evaluate {d}/mlp.safetensors --attack white-box-pgd --pgd-steps 0",
     "steps must be an integer ≥ 1"),
    ("audit-pgd-restarts-0", "audit {d}/mlp.safetensors --pgd-restarts 0",
     "restarts must be an integer ≥ 1"),
    ("audit-negative-step", "audit {d}/mlp.safetensors --pgd-step-size -0.01",
     "step size must be in (0, 1]"),
    ("audit-eps-too-big", "audit {d}/mlp.safetensors --eps 1.5", "must be a number in [0, 1]"),
    ("audit-unknown-autoattack", "audit {d}/mlp.safetensors --autoattack foolbox",
     "implementation must be one of torchattacks, reference"),
    ("evaluate-grid-empty", "evaluate {d}/mlp.safetensors --grid ,", "no strength in ','"),
    ("audit-norm-l1", "audit {d}/mlp.safetensors --norm l1", "unknown norm 'l1'"),
    ("audit-l2-eps-past-the-cube", "audit {d}/mlp.safetensors --norm l2 --eps 40",
     "an l2 strength must be a number in [0, 28]"),
    ("evaluate-l2-grid-past-the-cube", "evaluate {d}/mlp.safetensors --norm l2 --grid 0,29",
     "an l2 strength must be a number in [0, 28]"),
    ("evaluate-l2-without-a-grid", "evaluate {d}/mlp.safetensors --norm l2",
     "give --grid for l2"),
    ("audit-shard-size-0", "audit {d}/mlp.safetensors --shard-size 0",
     "--shard-size must be an integer ≥ 1"),
    ("audit-test-limit-words", "audit {d}/mlp.safetensors --test-limit many",
     "give a number of images or 'all'"),
    ("audit-merge-not-a-run", "audit-merge {d}", "is not a run directory"),
    ("evaluate-grid-out-of-range", "evaluate {d}/mlp.safetensors --grid 0,2",
     "must be a number in [0, 1]"),
    ("evaluate-test-limit-0", "evaluate {d}/mlp.safetensors --test-limit 0",
     "limit must be an integer ≥ 1"),
    ("evaluate-test-start-negative", "evaluate {d}/mlp.safetensors --test-start -1",
     "start must be an integer ≥ 0"),
    ("evaluate-test-start-past-the-end", "evaluate {d}/mlp.safetensors --test-start 10000",
     "--test-start 10000 is past the last of the 10000 test images"),
    ("audit-test-start-past-the-end", "audit {d}/mlp.safetensors --only-autoattack "
     "--test-start 10000", "--test-start 10000 is past the last of the 10000 test images"),
    ("audit-test-start-not-a-number", "audit {d}/mlp.safetensors --test-start x",
     "Invalid value for '--test-start'"),
    ("train-optimizer-bogus", "train {d}/m.safetensors --optimizer bogus",
     "unknown optimizer 'bogus'; choose one of: adam, sgd"),
    ("train-amp-fp8", "train {d}/m.safetensors --amp fp8",
     "unknown amp 'fp8'; choose one of: off, bf16, fp16"),
    ("train-hold-out-negative", "train {d}/m.safetensors --hold-out -1",
     "hold_out must be an integer ≥ 0"),
    ("train-trades-beta-negative", "train {d}/m.safetensors --recipe trades --trades-beta -1",
     "trades_beta must be a number ≥ 0"),
    ("train-mart-beta-negative", "train {d}/m.safetensors --recipe mart --mart-beta -1",
     "mart_beta must be a number ≥ 0"),
    ("train-trades-and-mart", "train {d}/m.safetensors --recipe mart --trades-beta 6",
     "choose one loss"),
    ("train-hold-out-everything", "train {d}/m.safetensors --hold-out 60000",
     "validation size must be in [0, 60000)"),
    ("train-clip-grad-negative", "train {d}/m.safetensors --clip-grad -1",
     "clip_grad must be ≥ 0"),
    ("train-stability-negative", "train {d}/m.safetensors --stability -1",
     "stability must be a number ≥ 0"),
    ("train-stability-noise-nan", "train {d}/m.safetensors --stability 1 --stability-noise nan",
     "stability_noise must be a number ≥ 0"),
    ("train-stability-move-negative", "train {d}/m.safetensors --stability 1 --stability-move -1",
     "stability_move must be an integer ≥ 0"),
    ("train-momentum-2", "train {d}/m.safetensors --momentum 2", "momentum must be in [0, 1)"),
    ("train-image-size-0", "train {d}/m.safetensors --image-size 0",
     "image_size must be an integer ≥ 1"),
    ("train-channels-for-a-named-dataset", "train {d}/m.safetensors --channels 2",
     "mnist has a fixed image shape"),
    ("train-workers-negative", "train {d}/m.safetensors --workers -1",
     "workers must be an integer ≥ 0"),
    ("train-weights-missing", "train {d}/m.safetensors --weights {d}/missing.safetensors",
     "weights file not found"),
    ("train-torchvision-model-unknown", "train {d}/m.safetensors --model torchvision:no_such_net",
     "torchvision has no model 'no_such_net'"),
    ("train-image-folder-missing", "train {d}/m.safetensors --data imagefolder:{d}/missing",
     "image folder not found"),
    ("train-device-tpu", "train {d}/m.safetensors --device tpu", "unknown device 'tpu'"),
    ("train-epochs-0", "train {d}/m.safetensors --epochs 0", "epochs must be an integer ≥ 1"),
    ("train-epochs-negative", "train {d}/m.safetensors --epochs -1",
     "epochs must be an integer ≥ 1"),
    ("train-train-limit-0", "train {d}/m.safetensors --train-limit 0",
     "limit must be an integer ≥ 1"),
    ("train-train-limit-negative", "train {d}/m.safetensors --train-limit -5",
     "limit must be an integer ≥ 1"),
    ("train-batch-size-0", "train {d}/m.safetensors --batch-size 0",
     "batch_size must be an integer ≥ 1"),
    ("train-strengths-empty", "train {d}/m.safetensors --strengths ,", "no strength in"),
    ("reproduce-strengths-empty", "reproduce mat --strengths , --out {d}/run", "no strength in"),
    # options of the AutoAttack and training-recipe work
    ("train-ramp-1", "train {d}/m.safetensors --ramp 1", "ramp must be in [0, 1)"),
    ("train-average-negative", "train {d}/m.safetensors --average -0.5",
     "average must be in [0, 1)"),
    ("train-label-smoothing-nan", "train {d}/m.safetensors --label-smoothing nan",
     "label_smoothing must be in [0, 1)"),
    ("train-schedule-bogus", "train {d}/m.safetensors --schedule cosine",
     "unknown schedule 'cosine'"),
    ("train-recipe-bogus", "train {d}/m.safetensors --recipe madry", "unknown recipe 'madry'"),
    ("reproduce-autoattack-limit-negative", "reproduce mat --autoattack-limit -1 --out {d}/run",
     "autoattack_limit must be an integer ≥ 0"),
    ("reproduce-autoattack-eps-too-big", "reproduce mat --autoattack-eps 2 --out {d}/run",
     "must be a number in [0, 1]"),
    ("reproduce-label-smoothing-1", "reproduce mat --label-smoothing 1 --out {d}/run",
     "label smoothing must be in [0, 1)"),
    ("reproduce-schedule-bogus", "reproduce mat --schedule warm --out {d}/run",
     "unknown schedule 'warm'"),
    ("detect-label-smoothing-1", "reproduce detect --label-smoothing 1 --out {d}/det",
     "label smoothing must be in [0, 1)"),
    ("detect-schedule-bogus", "reproduce detect --schedule cosine --out {d}/det",
     "unknown schedule 'cosine'"),
    # tracebacks before
    ("train-lr-negative", "train {d}/m.safetensors --lr -1", "lr must be a positive finite"),
    ("train-lr-nan", "train {d}/m.safetensors --lr nan", "lr must be a positive finite"),
    ("train-device-bogus", "train {d}/m.safetensors --device bogus", "unknown device 'bogus'"),
    ("evaluate-device-bogus", "evaluate {d}/mlp.safetensors --device gpu7",
     "unknown device 'gpu7'"),
    ("reproduce-device-bogus", "reproduce mat --device tpu --out {d}/run",
     "unknown device 'tpu'"),
    ("train-out-is-a-directory", "train {d}/a-directory", "is a directory"),
    ("train-out-below-a-file", "train {d}/a-file/m.safetensors", "is a file"),
    ("evaluate-out-is-a-directory", "evaluate {d}/mlp.safetensors --out {d}/a-directory",
     "is a directory"),
    ("audit-out-below-a-file", "audit {d}/mlp.safetensors --out {d}/a-file/x.json",
     "is a file"),
    ("reproduce-out-is-a-file", "reproduce mat --out {d}/a-file", "is a file"),
    ("detect-k-0", "reproduce detect --k 0 --out {d}/det", "k must be an integer ≥ 1"),
    ("detect-detectors-bogus", "reproduce detect --detectors knn,lid --out {d}/det",
     "unknown detector lid"),
    ("detect-keep-0", "reproduce detect --keep 0 --out {d}/det", "keep must be a number in"),
    ("detect-model-bogus", "reproduce detect --model resnet1000 --out {d}/det",
     "unknown model 'resnet1000'"),
    ("reproduce-victim-bogus", "reproduce mat --victim nonet --out {d}/run",
     "unknown model 'nonet'"),
    ("reproduce-tau-too-big", "reproduce mat --tau 2 --out {d}/run", "tau must be a number in"),
    ("reproduce-walks-0", "reproduce mat --walks 0 --out {d}/run", "walks must be an integer"),
    ("reproduce-penalty-positive", "reproduce mat --penalty 0.5 --out {d}/run",
     "penalty must be ≤ 0"),
    ("reproduce-voting-bogus", "reproduce mat --voting vote --out {d}/run",
     "unknown voting rule 'vote'"),
    ("reproduce-pgd-step-size-0", "reproduce mat --pgd-step-size 0 --out {d}/run",
     "pgd_step_size must be a number in (0, 1]"),
    ("ensemble-without-arch", "evaluate {d}/no-arch.safetensors",
     "needs a model description, or 'arch' and 'dataset'"),
    ("ensemble-members-abc", "evaluate {d}/members-abc.safetensors",
     "'members' must be an integer in [1, 64]"),
    ("ensemble-members-huge", "evaluate {d}/members-huge.safetensors",
     "'members' must be an integer in [1, 64]"),
    ("model-dataset-number", "evaluate {d}/dataset-number.safetensors",
     "needs a model description, or 'arch' and 'dataset' names"),
    ("matrix-bare-number", "select-strengths {d}/matrix-bare.json", "must be square"),
    ("select-positive-penalty", "select-strengths {d}/matrix-bare.json --penalty 0.1",
     "penalty must be ≤ 0"),
    ("select-combination-bogus", "select-strengths {d}/matrix-bare.json --combination single",
     "strength selection combines strengths for"),
    ("matrix-ragged", "select-strengths {d}/matrix-ragged.json", "rows of equal length"),
    ("matrix-strings", "select-strengths {d}/matrix-strings.json", "list of lists of numbers"),
    ("matrix-nan", "select-strengths {d}/matrix-nan.json", "finite non-negative"),
    ("matrix-rectangular", "select-strengths {d}/matrix-rectangular.json", "must be square"),
    ("matrix-file-a-list", "select-strengths {d}/matrix-list.json", "must hold a JSON object"),
    ("predict-npz", "predict {d}/mlp.safetensors {d}/x.npz", "is a .npz archive"),
    ("predict-strings", "predict {d}/mlp.safetensors {d}/strings.npy",
     "must be floating point in [0, 1], got dtype <U1"),
    ("predict-structured", "predict {d}/mlp.safetensors {d}/structured.npy",
     "got a structured array"),
    ("predict-objects", "predict {d}/mlp.safetensors {d}/objects.npy", "pickled data"),
    ("predict-uint8", "predict {d}/mlp.safetensors {d}/uint8.npy", "convert uint8 images"),
    ("predict-nan", "predict {d}/mlp.safetensors {d}/nan.npy", "NaN"),
    ("predict-3d", "predict {d}/mlp.safetensors {d}/3d.npy", "shape (N, C, H, W)"),
    ("predict-rgb-for-grey-model", "predict {d}/mlp.safetensors {d}/rgb.npy", "3 channels"),
    ("predict-empty-file", "predict {d}/mlp.safetensors {d}/empty.npy", "is empty (0 bytes)"),
    ("predict-text-file", "predict {d}/mlp.safetensors {d}/text.npy", "not a .npy file"),
    ("predict-truncated", "predict {d}/mlp.safetensors {d}/truncated.npy", "cannot read"),
    ("predict-missing", "predict {d}/mlp.safetensors {d}/missing.npy", "image file not found"),
    ("predict-a-directory", "predict {d}/mlp.safetensors {d}/a-directory", "is not a file"),
    ("checkpoint-missing", "evaluate {d}/missing.safetensors", "checkpoint not found"),
    ("checkpoint-not-safetensors", "evaluate {d}/a-file", "corrupt or truncated checkpoint"),
    ("report-not-a-run", "report {d}/a-directory", "holds no results.json"),
    ("guard-fit-missing-model", "guard fit {d}/missing.safetensors --out {d}/g",
     "checkpoint not found"),
    ("guard-fit-detector-bogus", "guard fit {d}/mlp.safetensors --out {d}/g --detector lid",
     "unknown detector 'lid'"),
    ("guard-fit-k-0", "guard fit {d}/mlp.safetensors --out {d}/g --k 0",
     "k must be an integer ≥ 1"),
    ("guard-fit-index-bogus", "guard fit {d}/mlp.safetensors --out {d}/g --index hnsw",
     "unknown index 'hnsw'"),
    ("guard-fit-keep-2", "guard fit {d}/mlp.safetensors --out {d}/g --keep 2",
     "keep must be a number in (0, 1]"),
    ("guard-fit-out-a-file", "guard fit {d}/mlp.safetensors --out {d}/a-file", "is a file"),
    ("serve-not-a-guard", "serve {d}/a-directory", "is not a guard folder"),
    ("serve-port-0", "serve {d}/a-directory --port 0", "port must be in 1..65535"),
    ("serve-workers-0", "serve {d}/a-directory --workers 0", "workers must be ≥ 1"),
    ("serve-threads-0", "serve {d}/a-directory --threads 0", "threads must be ≥ 1"),
    ("serve-flagged-limit-2", "serve {d}/a-directory --flagged-limit 2",
     "flagged_limit must be in [0, 1]"),
    ("serve-max-flagged-negative", "serve {d}/a-directory --max-flagged -1",
     "max_flagged must be an integer ≥ 0"),
    ("serve-max-repeats-abc", "serve {d}/a-directory --max-repeats abc",
     "Invalid value for '--max-repeats'"),
    ("serve-window-s-0", "serve {d}/a-directory --window-s 0", "window_s must be a finite"),
    ("serve-max-flips-negative", "serve {d}/a-directory --max-flips -2",
     "max_flips must be an integer ≥ 0"),
    ("serve-flagged-class-value", "serve {d}/a-directory --no-flagged-class yes",
     "Got unexpected extra argument"),
    ("serve-flag-beside-value", "serve {d}/a-directory --flag-beside=maybe",
     "Option '--flag-beside' does not take a value"),
    ("serve-outputs-bogus", "serve {d}/a-directory --outputs logits",
     "unknown outputs 'logits'; choose one of: label, top1, probabilities"),
    ("serve-decimals-negative", "serve {d}/a-directory --decimals -1",
     "decimals must be an integer ≥ 0"),
    ("serve-image-rate-0", "serve {d}/a-directory --image-rate 0",
     "image_rate must be a positive finite"),
    ("serve-image-burst-below-batch", "serve {d}/a-directory --image-burst 10",
     "image_burst must be an integer ≥ 64"),
    ("guard-fit-query-k-0", "guard fit {d}/mlp.safetensors --out {d}/g --query-k 0",
     "query_k must be an integer ≥ 1"),
    ("guard-fit-query-k-above-history",
     "guard fit {d}/mlp.safetensors --out {d}/g --query-k 50 --query-history 10",
     "query_k (50) and query_view_k (50) cannot exceed the history (10)"),
    ("guard-fit-query-view-k-0", "guard fit {d}/mlp.safetensors --out {d}/g --query-view-k 0",
     "query_view_k must be an integer ≥ 1"),
    ("guard-fit-query-global-below-k",
     "guard fit {d}/mlp.safetensors --out {d}/g --query-global 3",
     "query_global (3) must be 0 (off) or at least query_k (5)"),
    ("guard-fit-query-shift-3", "guard fit {d}/mlp.safetensors --out {d}/g --query-shift 3",
     "query_shift can be at most 2 (pixels), got 3"),
    ("guard-fit-query-crop-3", "guard fit {d}/mlp.safetensors --out {d}/g --query-crop 3",
     "query_crop can be at most 2 (pixels), got 3"),
    ("guard-fit-query-crop-negative",
     "guard fit {d}/mlp.safetensors --out {d}/g --query-crop -1",
     "query_crop must be an integer ≥ 0"),
    ("guard-fit-query-shift-negative",
     "guard fit {d}/mlp.safetensors --out {d}/g --query-shift -1",
     "query_shift must be an integer ≥ 0"),
    ("guard-fit-query-global-negative",
     "guard fit {d}/mlp.safetensors --out {d}/g --query-global -1",
     "query_global must be an integer ≥ 0"),
    ("guard-fit-query-false-alarm-2",
     "guard fit {d}/mlp.safetensors --out {d}/g --query-false-alarm 2",
     "query_false_alarm must be a number in (0, 1]"),
    ("guard-fit-familiar-keep-0", "guard fit {d}/mlp.safetensors --out {d}/g --familiar-keep 0",
     "familiar_keep must be a number in (0, 1]"),
    ("guard-fit-option-of-another-detector",  # refused, not ignored
     "guard fit {d}/mlp.safetensors --out {d}/g --detector mahalanobis --k 5",
     "the mahalanobis detector has no option k; its options: noise, combine_sigma, ridge"),
    ("guard-fit-unknown-detector", "guard fit {d}/mlp.safetensors --out {d}/g --detector lid",
     "unknown detector 'lid'"),
    ("train-l2-recipe-without-l2", "train {d}/o.safetensors --data mnist --model mlp3 --norm l2 "
     "--strengths 1 --recipe fgsm-rs", "fgsm-rs recipe crafts with RandomStartFGSM"),
    ("evaluate-unknown-attack", "evaluate {d}/mlp.safetensors --attack white-box-cw",
     "unknown attack 'white-box-cw'"),
    ("serve-window-0", "serve {d}/a-directory --window 0", "window must be an integer ≥ 1"),
    ("serve-cooldown-negative", "serve {d}/a-directory --cooldown -1", "cooldown_s must be"),
    ("serve-rate-0", "serve {d}/a-directory --rate 0", "rate must be a positive finite"),
    ("serve-burst-0", "serve {d}/a-directory --burst 0", "burst must be an integer ≥ 1"),
    ("serve-header-timeout-0", "serve {d}/a-directory --header-timeout 0",
     "header_timeout_s must be a positive finite"),
    ("serve-body-timeout-inf", "serve {d}/a-directory --body-timeout inf",
     "body_timeout_s must be a positive finite"),
    ("serve-max-batch-0", "serve {d}/a-directory --max-batch 0",
     "max_batch must be an integer ≥ 1"),
    # the command line itself
    ("option-not-a-number", "train {d}/m.safetensors --epochs abc", "Invalid value for '--epochs'"),
    ("option-unknown", "train {d}/m.safetensors --bogus 1", "No such option"),
    ("command-unknown", "fly", "No such command 'fly'"),
    ("argument-missing", "evaluate", "give a checkpoint, or --model (with --weights) and --data"),
    ("predict-argument-missing", "predict", "Missing argument"),
    ("dataset-unknown", "reproduce mat --dataset imagenet --out {d}/run",
     "unknown dataset 'imagenet'"),
]


@pytest.mark.parametrize("args, needle", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_the_cli_refuses_in_one_line(args, needle, files, cli):
    before = sorted(p.name for p in files.iterdir())
    result = cli(*args.format(d=files).split())
    assert_one_line_error(result, needle)
    # refused before any work: no model, run directory or state appeared
    assert sorted(p.name for p in files.iterdir()) == before


def test_big_endian_float64_images_are_read_not_refused(files, cli):
    result = cli("predict", str(files / "mlp.safetensors"), str(files / "float64-big-endian.npy"))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2


# --- the Python API ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    test = load_dataset("mnist", "test", limit=8)
    torch.manual_seed(0)
    return test.x, test.y, build_model("mlp3", "mnist").eval()


API_ROWS = [
    ("fgsm-float64", lambda x, y, m: fgsm(m, x.double(), y, 0.1), "must be float32"),
    ("fgsm-eps-true", lambda x, y, m: fgsm(m, x, y, True), "must be a number in [0, 1]"),
    ("fgsm-eps-string", lambda x, y, m: fgsm(m, x, y, "0.1"), "must be a number in [0, 1]"),
    ("fgsm-eps-none", lambda x, y, m: fgsm(m, x, y, None), "must be a number in [0, 1]"),
    ("fgsm-eps-negative", lambda x, y, m: fgsm(m, x, y, -0.1), "must be a number in [0, 1]"),
    ("fgsm-eps-nan", lambda x, y, m: fgsm(m, x, y, float("nan")), "must be a number in [0, 1]"),
    ("fgsm-label-too-big", lambda x, y, m: fgsm(m, x, y * 0 + 10, 0.1), "labels must lie in"),
    ("fgsm-label-negative", lambda x, y, m: fgsm(m, x, y * 0 - 1, 0.1), "labels must lie in"),
    ("fgsm-float-labels", lambda x, y, m: fgsm(m, x, y.float(), 0.1), "integer tensor"),
    ("fgsm-numpy-images", lambda x, y, m: fgsm(m, x.numpy(), y, 0.1), "must be a torch.Tensor"),
    ("fgsm-wrong-size", lambda x, y, m: fgsm(m, x[:, :, :20, :20].contiguous(), y, 0.1),
     "expects images of shape (N, 1, 28, 28)"),
    ("pgd-restarts-0", lambda x, y, m: PGD(restarts=0), "restarts must be an integer ≥ 1"),
    ("pgd-steps-0", lambda x, y, m: PGD(steps=0), "steps must be an integer ≥ 1"),
    ("pgd-steps-float", lambda x, y, m: PGD(steps=2.5), "steps must be an integer ≥ 1"),
    ("pgd-negative-step", lambda x, y, m: PGD(step_size=-0.01), "step size must be in (0, 1]"),
    ("pgd-label-too-big", lambda x, y, m: PGD(steps=1)(m, x, y + 10, 0.1), "labels must lie in"),
    ("lbfgs-empty", lambda x, y, m: LBFGS()(m, x[:0], y[:0], 1.0), "are empty"),
    ("knn-k-float", lambda x, y, m: KNNDetector(k=2.5), "k must be an integer ≥ 1"),
    ("knn-k-0", lambda x, y, m: KNNDetector(k=0), "k must be an integer ≥ 1"),
    ("knn-keep-2", lambda x, y, m: KNNDetector(keep=2.0), "keep must be a number in (0, 1]"),
    ("knn-device", lambda x, y, m: KNNDetector(device="quantum"), "unknown device"),
    ("knn-unfitted", lambda x, y, m: KNNDetector().predict(x), "not fitted"),
    ("train-config-epochs-0", lambda x, y, m: TrainConfig(epochs=0), "epochs must be"),
    ("train-config-lr-inf", lambda x, y, m: TrainConfig(lr=float("inf")), "lr must be"),
    ("train-config-device", lambda x, y, m: TrainConfig(device="cuda:99"), "device 'cuda:99'"),
    ("mix-strength-2", lambda x, y, m: StrengthMix((2.0,)), "must be a number in [0, 1]"),
    ("dataset-limit-0", lambda x, y, m: load_dataset("mnist", limit=0), "limit must be"),
    ("dataset-limit-negative", lambda x, y, m: load_dataset("mnist", limit=-5), "limit must be"),
    ("matrix-ragged", lambda x, y, m: exhaustive_select([[1.0, 0.5], [0.3]]), "equal length"),
    ("matrix-strings", lambda x, y, m: random_walk_select([["a"]]), "list of lists of numbers"),
]


@pytest.mark.parametrize("call, needle", [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS])
def test_the_api_refuses_with_an_input_error(call, needle, batch):
    with pytest.raises(InputError) as info:
        call(*batch)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("eps", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1),
                                 np.array(0.1), 0, 1])
def test_numpy_and_tensor_strengths_are_numbers(eps, batch):
    x, y, m = batch
    adv = fgsm(m, x, y, eps)
    assert isinstance(adv, torch.Tensor) and torch.equal(adv, signed_step(m, x, y, float(eps)))


def signed_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                eps: float) -> torch.Tensor:
    """FGSM written out here, the reference the attack must equal: x + ε·sign(∇ₓ CE), in [0, 1]."""
    x = x.detach().float().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert x.grad is not None
    return (x + eps * x.grad.sign()).clamp(0, 1).detach()


def test_a_list_of_strengths_may_be_an_array(batch):
    x, y, m = batch
    advs = fgsm(m, x, y, np.array([0.1, 0.2]))
    assert isinstance(advs, list) and len(advs) == 2


# --- property-based: random arrays at the boundary --------------------------------------------

DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.uint8, np.int64, np.bool_,
                          np.complex64])
SHAPES = st.one_of(hnp.array_shapes(min_dims=0, max_dims=5, max_side=4),
                   st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.just(28),
                             st.just(28)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(array=hnp.arrays(DTYPES, SHAPES))
def test_predict_input_gives_a_result_or_one_line_error(array, batch):
    """Whatever array arrives: classes for a valid image batch, else one InputError line."""
    _, _, model = batch
    try:
        x = images_from_array(array, channels=1, size=(28, 28))
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    assert model(x).argmax(1).shape == (len(x),)


@st.composite
def fgsm_calls(draw: st.DrawFn) -> tuple[np.ndarray, list[int], object]:
    """Images, labels and a strength for FGSM, valid about half the time (so the attack's
    result is checked as often as its refusals): a batch of 1–3, one wrong part at most."""
    n = draw(st.integers(1, 3))
    broken = draw(st.sampled_from([None] * 4 + ["dtype", "pixel", "labels", "eps"]))
    dtype = (draw(st.sampled_from([np.float64, np.float16])) if broken == "dtype"
             else np.float32)
    images = draw(hnp.arrays(dtype, (n, draw(st.sampled_from([1, 1, 1, 2])), 28, 28),
                             elements=st.floats(0, 1, width=16)))
    if broken == "pixel":
        images[0, 0, 0, 0] = draw(st.sampled_from([-0.5, 1.5, float("nan"), float("inf")]))
    labels = (draw(st.lists(st.integers(-2, 12), min_size=1, max_size=4)) if broken == "labels"
              else draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)))
    eps = (draw(st.one_of(st.floats(-1, 2), st.just(float("nan")), st.booleans(), st.none()))
           if broken == "eps" else
           draw(st.one_of(st.floats(0, 1), st.lists(st.floats(0, 1), min_size=1, max_size=3))))
    return images, labels, eps


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(call=fgsm_calls())
def test_fgsm_gives_the_signed_step_or_one_line_error(call, batch):
    _, _, model = batch
    images, labels, eps = call
    x, y = torch.from_numpy(images), torch.tensor(labels)
    try:
        out = FGSM()(model, x, y, eps)
    except AdvguardError as exc:
        assert isinstance(exc, InputError) and "\n" not in str(exc)
        return
    for adv, e in zip(out if isinstance(out, list) else [out],
                      eps if isinstance(eps, list) else [eps], strict=True):
        # the signed gradient step itself, not only some image inside the ball
        assert torch.allclose(adv, signed_step(model, x, y, float(e)), atol=1e-6)


# --- runs that must not lose or mix work ------------------------------------------------------


def test_train_refuses_a_leftover_state_of_another_run(tmp_path, cli):
    out = tmp_path / "m.safetensors"
    # a clean run of 1 epoch, interrupted before its model was written, left its state ...
    from advguard.training import StrengthMix, TrainConfig, train

    data = load_dataset("mnist", limit=200)
    torch.manual_seed(0)
    train(build_model("mlp3", "mnist"), data, StrengthMix(), None,
          TrainConfig(epochs=1, batch_size=128), state_path=out.with_suffix(".state.pt"),
          pin={"arch": "mlp3", "dataset": "mnist", "train_images": 200, "recipe": "fgsm",
               "crafter": None}, progress=False)
    # ... and another configuration aimed at the same path is refused, the state kept
    result = cli("train", str(out), "--train-limit", "200", "--epochs", "1", "--strengths",
                 "0.3", "--quiet")
    assert_one_line_error(result, "state of a different training run (strengths differ)")
    assert out.with_suffix(".state.pt").exists()
    # the options it was started with resume it
    resumed = cli("train", str(out), "--train-limit", "200", "--epochs", "1")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stderr


def test_ctrl_c_says_how_to_resume(tmp_path, cli, monkeypatch):
    import advguard.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(advguard.data.sources, "load_dataset", interrupted)
    result = cli("train", str(tmp_path / "m.safetensors"))
    assert result.returncode == 130
    assert "interrupted: finished stages, epochs and pieces are saved; run the same command to " \
           "resume" in result.stderr and "Traceback" not in result.stderr


def test_a_failed_run_does_not_block_the_corrected_command(tmp_path, cli):
    out = tmp_path / "run"
    failed = cli("reproduce", "mat", "--dataset", "cifar10", "--data-dir",
                 str(tmp_path / "nowhere"), "--out", str(out))
    assert_one_line_error(failed, "CIFAR-10 not found")
    from advguard.reproduce.mat import MatConfig
    from advguard.reproduce.rundir import open_run

    with open_run(MatConfig(strengths=(0.1,)), out) as (cfg, _):  # accepted, not "different"
        assert cfg.dataset == "mnist"


def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, cli):
    from advguard.io import hold_lock

    out = tmp_path / "run"
    with hold_lock(out / ".lock", f"run directory {out}"):
        result = cli("reproduce", "mat", "--out", str(out), "--strengths", "0.1")
    assert_one_line_error(result, f"run directory {out} is in use by pid")
    with hold_lock(tmp_path / "m.lock", "output m"):
        result = cli("train", str(tmp_path / "m.safetensors"), "--train-limit", "100")
    assert_one_line_error(result, "is in use by pid")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(tmp_path, cli):
    assert_one_line_error(cli("train", str(tmp_path / "m.safetensors"), "--device", "cuda"),
                          "CUDA is not available on this machine")
