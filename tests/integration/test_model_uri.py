"""Model URIs on S3: a checkpoint folder saved to a real moto S3 server on loopback resolves to a local cached folder
that loads with the same weights (and upscales exactly as the original folder does); a changed checkpoint is fetched
again; a folder without one is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobkit.config import config_from_dict
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.s3_fixture import s3  # noqa: F401 - pytest fixture
from vosr.checkpoint import load_checkpoint, save_checkpoint
from vosr.model import build_dit
from vosr.upscaler import Upscaler

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2"]


def save_tiny(uri: str, endpoint: str, seed: int) -> dict[str, torch.Tensor]:
    cfg = config_from_dict({}, TINY)
    torch.manual_seed(seed)
    model = build_dit(cfg)
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.05)   # zero at init (docs/method.md s4): make it distinct
    save_checkpoint(uri, cfg, model, endpoint_url=endpoint)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_s3_checkpoint_resolves_to_a_cached_local_folder(s3, tmp_path):  # noqa: F811
    from inference.model_uri import ModelNotFoundError, resolve_model

    uri = s3.uri("models/run1/checkpoint_000002")
    weights = save_tiny(uri, s3.endpoint_url, seed=1)
    cfg = config_from_dict({}, [*TINY, f"train.s3_endpoint_url={s3.endpoint_url}"])
    cache = tmp_path / "cache"

    folder = resolve_model(uri, cfg, download_root=cache)
    assert folder.parent == cache and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    model, _, _ = load_checkpoint(str(folder), use_ema=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    # the parent prefix with exactly one checkpoint inside resolves too; unchanged -> the same cache folder
    assert resolve_model(uri + "/", cfg, download_root=cache) == folder
    parent = resolve_model(s3.uri("models/run1"), cfg, download_root=cache)
    assert parent.name == "checkpoint_000002" and (parent / "model.safetensors").is_file() and parent != folder

    # a changed checkpoint at the same URI is fetched again (new sizes/etags -> new cache key), with new weights
    new_weights = save_tiny(uri, s3.endpoint_url, seed=2)
    again = resolve_model(uri, cfg, download_root=cache)
    assert again != folder
    model2, _, _ = load_checkpoint(str(again), use_ema=False)
    k = "final_layer.linear.weight"
    assert torch.equal(model2.state_dict()[k], new_weights[k]) and not torch.equal(new_weights[k], weights[k])

    # no checkpoint there: the URI and what was expected are named
    s3.put_bytes(b"{}", "models/empty/config.json")
    with pytest.raises(ModelNotFoundError, match=r"no checkpoint at s3://vosr-test/models/empty.*config.json \+ "
                                                 r"model.safetensors"):
        resolve_model(s3.uri("models/empty"), cfg, download_root=cache)
    with pytest.raises(ModelNotFoundError, match="no checkpoint at s3://vosr-test/nothing-here"):
        resolve_model(s3.uri("nothing-here"), cfg, download_root=cache)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"student": make_checkpoint(tmp_path_factory.mktemp("ckpt") / "student", True)}


@pytest.fixture(scope="module")
def photo(photos):
    return Image.open(photos[0]).convert("RGB")


@pytest.mark.usefixtures("one_torch_thread")  # as the other upscaler tests (tests/conftest.py)
def test_checkpoint_on_s3_is_copied_and_loads(checkpoints, photo, tmp_path):
    from inference.model_uri import resolve_model
    from tests.helpers.s3_fixture import s3_server

    src = Path(checkpoints["student"])
    with s3_server() as site:
        for f in src.rglob("*"):
            if f.is_file():
                site.put_file(f, f"ckpt/student/{f.relative_to(src)}")
        cfg = config_from_dict({}, [f"train.s3_endpoint_url={site.endpoint_url}"])
        local = resolve_model(site.uri("ckpt/student"), cfg, download_root=tmp_path / "dl")
        # the checkpoint files, plus the cache's own record of where they came from
        assert sorted(p.name for p in local.iterdir()) == sorted([*(p.name for p in src.iterdir()), "SOURCE.json"])
        a = Upscaler(str(local), device="cpu").upscale(photo.resize((24, 16)), seed=3)
        b = Upscaler(checkpoints["student"], device="cpu").upscale(photo.resize((24, 16)), seed=3)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        with pytest.raises(FileNotFoundError, match="no checkpoint at"):
            resolve_model(site.uri("ckpt/missing"), cfg, download_root=tmp_path / "dl2")
