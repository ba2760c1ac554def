"""The L2 threat model: the ball's projection, start and direction; FGM's strengths from one
gradient; advguard's L2 PGD against torchattacks' (an independent implementation); the
standard L2 AutoAttack through torchattacks against the authors' code; and --norm l2 on the
command line."""

from __future__ import annotations

import pytest
import torch

from advguard.attacks import FGM, L2, LINF, PGD, norm_named
from advguard.errors import InputError
from advguard.evaluation import AutoAttack


def test_the_l2_ball_projects_starts_and_steps_inside_itself():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=gen)
    far = x + 5 * torch.randn(x.shape, generator=gen)
    eps = torch.linspace(0.1, 3.0, 64)
    for point in (L2.project(x, far, eps.view(-1, 1, 1, 1)), L2.random_start(x, 1.5, gen)):
        assert point.min() >= 0 and point.max() <= 1
    assert (L2.distance(L2.project(x, far, eps.view(-1, 1, 1, 1)), x) <= eps + 1e-5).all()
    assert (L2.distance(L2.random_start(x, 1.5, gen), x) <= 1.5 + 1e-5).all()
    near = x + 1e-3 * torch.randn(x.shape, generator=gen)
    assert torch.allclose(L2.project(x, near, 3.0), near.clamp(0, 1))  # inside: unchanged
    g = torch.randn(4, 3, 8, 8, generator=gen)
    assert torch.allclose(L2.direction(g).flatten(1).norm(dim=1), torch.ones(4))
    assert torch.equal(LINF.direction(g), g.sign())
    with pytest.raises(InputError, match="unknown norm 'l1'"):
        norm_named("l1")
    with pytest.raises(InputError, match=r"an l2 strength must be a number in \[0, 28\]"):
        L2.check(29.0, (1, 28, 28))


def test_fgm_crafts_every_strength_from_one_gradient(trained_mlp, mnist_test):
    x, y = mnist_test.x[:200], mnist_test.y[:200]
    calls = []
    handle = trained_mlp.register_forward_hook(lambda *_: calls.append(1))
    try:
        advs = FGM()(trained_mlp, x, y, [0.5, 1.0, 1.5, 2.0, 3.0])
    finally:
        handle.remove()
    assert len(calls) == 2  # the class count, then one forward (+ backward) for all five
    accuracy = [float((trained_mlp(a).argmax(1) == y).float().mean()) for a in advs]
    assert accuracy == sorted(accuracy, reverse=True) and accuracy[0] > accuracy[-1] + 0.3
    for eps, adv in zip((0.5, 1.0, 1.5, 2.0, 3.0), advs, strict=True):
        assert (L2.distance(adv, x) <= eps + 1e-5).all()
        assert (L2.distance(adv, x) > 0.5 * eps).float().mean() > 0.9  # it used the ball


def test_l2_pgd_agrees_with_torchattacks(trained_mlp, mnist_test):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = mnist_test.x[:300], mnist_test.y[:300]
    ours = PGD(steps=20, norm="l2", seed=0)(trained_mlp, x, y, 1.0)
    torch.manual_seed(0)
    theirs = torchattacks.PGDL2(trained_mlp, eps=1.0, alpha=2.5 * 1.0 / 20, steps=20)(x, y)
    right = [float((trained_mlp(a).argmax(1) == y).float().mean()) for a in (ours, theirs)]
    clean = float((trained_mlp(x).argmax(1) == y).float().mean())
    assert right[0] < clean - 0.2  # it attacks
    assert abs(right[0] - right[1]) <= 0.03, right
    assert (L2.distance(ours, x) <= 1.0 + 1e-5).all()


def test_l2_autoattack_agrees_with_the_authors_code(trained_mlp, mnist_test):
    pytest.importorskip("pyautoattack")
    x, y = mnist_test.x[:60], mnist_test.y[:60]
    ours = AutoAttack(norm="l2", square_alone=False).evaluate(trained_mlp, x, y, 1.0,
                                                              batch_size=60)
    ref = AutoAttack(norm="l2", square_alone=False, implementation="reference").evaluate(
        trained_mlp, x, y, 1.0, batch_size=60)
    assert 0.1 < ref.robust_accuracy < ref.clean_accuracy - 0.2
    for name in ref.robust_after:
        assert abs(ours.robust_after[name] - ref.robust_after[name]) <= 1 / 60 + 1e-9, name
    assert (L2.distance(ours.adv, x) <= 1.0 + 1e-4).all()


def test_norm_l2_on_the_command_line(cli, tmp_path, trained_mlp):
    import json

    from advguard.models.checkpoint import save_model

    save_model(tmp_path / "m.safetensors", trained_mlp, arch="mlp3", dataset="mnist")
    m = str(tmp_path / "m.safetensors")
    curve = cli("evaluate", m, "--norm", "l2", "--grid", "0,1,2", "--test-limit", "100",
                "--out", str(tmp_path / "c.json"), "-q")
    assert curve.returncode == 0, curve.stderr
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["norm"] == "l2" and result["curve"][0] > result["curve"][2] + 0.3
    audited = cli("audit", m, "--norm", "l2", "--eps", "1", "--only-autoattack",
                  "--test-limit", "20", "--out", str(tmp_path / "a.json"), "-q")
    assert audited.returncode == 0 and "l2 ε = 1" in audited.stdout, audited.stderr
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["plan"]["autoattack"]["norm"] == "l2" and report["plan"]["norm"] == "l2"
    refused = cli("evaluate", m, "--norm", "l2", "--test-limit", "10")
    assert refused.returncode == 2 and "give --grid for l2" in refused.stderr
    refused = cli("audit", m, "--eps", "2", "--test-limit", "10")
    assert refused.returncode == 2 and "an linf strength must be a number in [0, 1]" in \
        refused.stderr
