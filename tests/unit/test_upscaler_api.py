"""The Python API: `from vosr import Upscaler`, `Upscaler.from_pretrained(uri)`, `up(image)` on PIL, numpy and
torch inputs (the result has the input's kind); vosr stays free of Ray and MLflow at import time; unknown URI
schemes are refused with the known ones listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    from vosr import Upscaler

    folder = make_checkpoint(tmp_path_factory.mktemp("api") / "student", student=True)
    return Upscaler.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def lr(photos) -> Image.Image:
    return Image.open(photos[2]).convert("RGB").resize((21, 15), Image.BICUBIC)


def test_import_vosr_pulls_in_neither_ray_nor_mlflow():
    code = ("import sys; from vosr import Upscaler; import vosr.model_uri, vosr.upscaler, vosr.memory; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_pil_numpy_and_torch_inputs(up, lr):
    pil = up(lr, seed=3)
    assert isinstance(pil, Image.Image) and pil.size == (84, 60)
    assert np.array_equal(np.asarray(pil), np.asarray(up.upscale(lr, seed=3)))
    # numpy uint8 (H x W x 3) -> uint8, the same pixels as the PIL path
    arr = up(np.asarray(lr), seed=3)
    assert arr.dtype == np.uint8 and arr.shape == (60, 84, 3) and np.array_equal(arr, np.asarray(pil))
    # float inputs in [0, 1] -> float32 in [0, 1], unquantised, the same picture
    f = up(np.asarray(lr).astype(np.float32) / 255, seed=3)
    assert f.dtype == np.float32 and f.shape == (60, 84, 3) and 0 <= f.min() and f.max() <= 1
    assert np.abs(f * 255 - np.asarray(pil)).mean() < 1.0
    t = torch.from_numpy(np.asarray(lr).copy()).permute(2, 0, 1).float() / 255
    tt = up(t, seed=3)
    assert tt.shape == (3, 60, 84) and tt.dtype == torch.float32
    assert np.allclose(tt.permute(1, 2, 0).numpy(), f, atol=1e-5)
    # a torch batch is one forward pass; every image equals its own single run
    other = torch.from_numpy(np.asarray(lr.transpose(Image.FLIP_LEFT_RIGHT)).copy()).permute(2, 0, 1).float() / 255
    batch = up(torch.stack([t, other]), seed=3)
    assert batch.shape == (2, 3, 60, 84)
    assert torch.allclose(batch[0], tt, atol=1e-5) and torch.allclose(batch[1], up(other, seed=3), atol=1e-5)
    # uint8 torch -> uint8 torch; a list of images -> a list
    u8 = up((t * 255).round().to(torch.uint8), seed=3)
    assert u8.dtype == torch.uint8 and np.array_equal(u8.permute(1, 2, 0).numpy(), np.asarray(pil))
    pair = up([lr, lr.transpose(Image.FLIP_LEFT_RIGHT)], seed=3)
    assert len(pair) == 2 and np.array_equal(np.asarray(pair[0]), np.asarray(pil))
    with pytest.raises(TypeError, match="PIL image, a numpy array or a torch tensor"):
        up("photo.png")


def test_unknown_scheme_is_refused_with_the_known_ones(tmp_path):
    from vosr import Upscaler
    from vosr.model_uri import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"unknown scheme 'gs'.*known: .*models.*s3"):
        Upscaler.from_pretrained("gs://bucket/model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        Upscaler.from_pretrained(str(tmp_path / "nothing"))
