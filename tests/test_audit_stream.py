"""The audit image by image: streamed from a dataset in shards it gives the in-memory audit's
outcome for every image; a run killed part-way resumes without redoing finished shards and
ends with the outcome of an uninterrupted one; a run directory of another model is refused;
runs of other slices merge, and runs of another plan do not."""

from __future__ import annotations

import json

import pytest
import torch

from advguard.attacks import PGD
from advguard.errors import InputError
from advguard.evaluation import AuditPlan, AutoAttack, Outcomes, audit, read_run, run_shards
from advguard.io import state_sha256

QUICK_AA = AutoAttack(steps=5, queries=50)
PLAN = dict(pgd=PGD(steps=3), step_sweep=(2,), attacks={}, autoattack=QUICK_AA)


@pytest.fixture(scope="module")
def images(mnist_test):
    return mnist_test.subset(slice(0, 90))


def manifest(model, plan, **extra):
    return {"model": {"state_sha256": state_sha256(model)}, "plan": plan.describe(), **extra}


def test_streamed_shards_give_the_in_memory_audit_image_by_image(trained_mlp, images):
    plan = AuditPlan.make(0.1, **PLAN)
    streamed = run_shards(plan.batch(trained_mlp), images, shard_size=30)
    assert streamed.rows.tolist() == list(range(90))
    whole = audit(trained_mlp, images.x, images.y, 0.1, batch_size=30, **PLAN)
    assert plan.report(streamed).to_json() == whole.to_json()
    # the robust images are those every attack failed on, image by image
    cols = streamed.columns
    robust = cols["clean"] & cols["advguard PGD-3 x1"] & cols["advguard PGD-2"] & cols[
        "AutoAttack Square"]
    assert whole.worst_case_accuracy == int(robust.sum()) / 90 < whole.clean_accuracy


def test_a_killed_run_resumes_where_it_stopped(trained_mlp, images, tmp_path):
    plan = AuditPlan.make(0.1, **PLAN)
    fn, calls = plan.batch(trained_mlp), []

    def killed_after_two(x, y):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(x))
        return fn(x, y)

    run = tmp_path / "parts"
    m = manifest(trained_mlp, plan)
    with pytest.raises(KeyboardInterrupt):
        run_shards(killed_after_two, images, shard_size=20, directory=run, manifest=m)
    assert len(list((run / "shards").glob("*.json"))) == 2

    def counted(x, y):
        calls.append(len(x))
        return fn(x, y)

    resumed = run_shards(counted, images, shard_size=20, directory=run, manifest=m)
    assert calls == [20, 20, 20, 20, 10]  # the two finished shards were not run again
    straight = run_shards(fn, images, shard_size=20)
    assert all(torch.equal(resumed.columns[k], straight.columns[k]) for k in straight.columns)


def test_a_run_directory_of_another_model_is_refused(trained_mlp, trained_lenet, images,
                                                     tmp_path):
    plan = AuditPlan.make(0.1, **PLAN)
    run = tmp_path / "parts"
    run_shards(plan.batch(trained_mlp), images.subset(slice(0, 20)), shard_size=20,
               directory=run, manifest=manifest(trained_mlp, plan))
    with pytest.raises(InputError, match="holds a run of another model"):
        run_shards(plan.batch(trained_lenet), images.subset(slice(0, 20)), shard_size=20,
                   directory=run, manifest=manifest(trained_lenet, plan))


def test_runs_of_other_slices_merge_and_runs_of_another_plan_do_not(trained_mlp, images,
                                                                    tmp_path):
    plan = AuditPlan.make(0.1, **PLAN)
    fn = plan.batch(trained_mlp)
    for name, a, b in (("first", 0, 40), ("second", 40, 90)):
        run_shards(fn, images.subset(slice(a, b)), shard_size=20, first_row=a,
                   directory=tmp_path / name,
                   manifest=manifest(trained_mlp, plan, data_slice=[a, b]))
    merged_manifest, merged = read_run([tmp_path / "first", tmp_path / "second"])
    assert merged.rows.tolist() == list(range(90))
    assert merged_manifest["plan"]["eps"] == 0.1
    whole = run_shards(fn, images, shard_size=20)  # shards of 20 from 0 and from 40: aligned
    assert all(torch.equal(merged.columns[k], whole.columns[k]) for k in whole.columns)

    other = AuditPlan.make(0.1, **{**PLAN, "autoattack": AutoAttack(steps=5, queries=50,
                                                                    seed=1)})
    run_shards(other.batch(trained_mlp), images.subset(slice(0, 20)), shard_size=20,
               directory=tmp_path / "seed1", manifest=manifest(trained_mlp, other))
    with pytest.raises(InputError, match="run of another plan"):
        read_run([tmp_path / "first", tmp_path / "seed1"])


def test_one_image_with_two_outcomes_is_refused():
    a = Outcomes(torch.tensor([0, 1]), {"clean": torch.tensor([True, True])})
    b = Outcomes(torch.tensor([1, 2]), {"clean": torch.tensor([False, True])})
    with pytest.raises(InputError, match="image 1 has two different outcomes"):
        Outcomes.cat([a, b])
    same = Outcomes.cat([a, Outcomes(torch.tensor([1]), {"clean": torch.tensor([True])})])
    assert same.rows.tolist() == [0, 1]
    assert Outcomes.from_json(json.loads(json.dumps(a.to_json()))).columns["clean"].all()


def test_a_streamed_curve_is_the_in_memory_curve(trained_mlp, images):
    from advguard.evaluation import ThreatSetting, fgsm_curve
    from advguard.evaluation.robustness import curve_batch, strength_column

    grid = [0.0, 0.05, 0.1, 0.2]
    streamed = run_shards(curve_batch(trained_mlp, grid, ThreatSetting.WHITE_BOX_FGSM),
                          images, shard_size=25)
    curve = [int(streamed.columns[strength_column(e)].sum()) / 90 for e in grid]
    assert curve == fgsm_curve(trained_mlp, images.x, images.y, grid)
    assert curve[0] > curve[-1] + 0.2  # it attacked


def test_the_default_grid_follows_the_strength_the_model_was_trained_at():
    from advguard.cli.evaluation import _grid

    default = tuple(i / 255 for i in range(9))  # an image folder's: 0 … 8/255
    grid, said = _grid((), default, {"strengths": [16 / 255]})
    assert len(grid) == 17 and grid[-1] == pytest.approx(16 / 255)
    assert "extended to the model's training strength" in said
    assert _grid((), default, {"strengths": [4 / 255]}) == (list(default), "the data's default")
    assert _grid((0.1,), default, {"strengths": [0.5]}) == ([0.1], "--grid")
