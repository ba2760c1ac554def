"""The README's Python snippet runs as written, on a folder of photos, with a plain
torchvision model (which returns a tensor, the commonest case)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert code is not None and "photos/train" in code.group(1)
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        folder = tmp_path / "photos" / "train" / label
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                folder / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code.group(1), str(README), "exec"), scope)  # noqa: S102 - our own README
    model = scope["model"]
    assert model(scope["data"][0][0][None].float()).shape == (1, 2)


def test_a_grey_folder_read_as_colour_into_a_grey_model_is_one_clear_error(tmp_path):
    import pytest
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from advguard.data import with_info
    from advguard.errors import InputError
    from advguard.models import build_model
    from advguard.training import StrengthMix, TrainConfig, train

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(tmp_path / label / "0.png")
    data = with_info(ImageFolder(str(tmp_path), v2.Compose([v2.ToImage(), v2.ToDtype(
        __import__("torch").float32, scale=True)])))  # ImageFolder reads every image as RGB
    with pytest.raises(InputError, match=r"cannot take the data's 3x28x28 images \(colour "
                                         r"images for a grey model\? add v2.Grayscale"):
        train(build_model("lenet5", "mnist"), data, StrengthMix(), None,
              TrainConfig(epochs=1), progress=False)
