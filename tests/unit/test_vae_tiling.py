"""Tiled autoencoder passes (vosr/encoders/tiled.py) and the memory plan that switches them on (vosr/memory.py):
the blend is an exact partition of unity (a tile-local codec gives the whole-image result bit for bit), a real
diffusers VAE tiled stays close to its whole-image pass with seams measured, and the Upscaler picks tiles when its
budget is small and none when it is large."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vosr.encoders.tiled import decode_tiled, moments_tiled, seam_report, tile_starts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_blend_is_exact_for_a_tile_local_codec():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3 * 64, 21, 30, generator=g)           # 168 x 240 px at factor 8
    whole = F.pixel_shuffle(z, 8)
    tiled = decode_tiled(lambda t: F.pixel_shuffle(t, 8), z, 64, 8)
    assert tiled.shape == whole.shape and torch.allclose(tiled, whole, atol=1e-6)
    x = torch.rand(1, 3, 168, 240, generator=g)
    enc = moments_tiled(lambda t: F.pixel_unshuffle(t, 8), x, 96, 8, 192)
    assert torch.allclose(enc, F.pixel_unshuffle(x, 8), atol=1e-6)
    assert tile_starts(10, 4, 1) == [0, 3, 6] and tile_starts(5, 8, 2) == [0]


@pytest.fixture(scope="module")
def sd_vae_folder(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4, latent_channels=4,
                        layers_per_block=1).eval()
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def test_tiled_sd_vae_is_close_and_its_seams_are_measured(sd_vae_folder, photos):
    from PIL import Image

    from jobkit.config import config_from_dict
    from vosr.encoders import build_autoencoder

    cfg = config_from_dict({}, ["preset=vosr-0.5b", f"autoencoder.path={sd_vae_folder}"])
    codec = build_autoencoder(cfg.autoencoder)
    img = Image.open(photos[0]).convert("RGB").crop((0, 0, 192, 160))
    x = torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    # encode: blended moments, then one posterior draw for the whole latent. Tiles see only themselves (group
    # norms, mid-block attention), so the result moves away from the whole-image pass as tiles shrink
    zw = codec.encode(x, sample=False)
    errs = {t: (codec.encode(x, sample=False, tile=t) - zw).abs().mean().item() for t in (64, 128)}
    assert errs[128] < errs[64] < (zw - zw.mean()).abs().mean().item(), errs
    assert codec.encode(x, sample=False, tile=64).shape == zw.shape == (1, 4, 20, 24)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    drawn = codec.encode(x, sample=True, generator=gen[0], tile=128) - codec.encode(x, sample=True, generator=gen[1])
    assert drawn.abs().mean().item() < errs[64], "the posterior noise must not depend on the tiling"
    # decode: same size; the report separates the seams (blend regions) from the rest; larger tiles, smaller error
    whole = codec.decode(zw)
    reports = {t: seam_report(codec.decode(zw, tile=t), whole, t, 8) for t in (64, 128)}
    assert codec.decode(zw, tile=64).shape == whole.shape == (1, 3, 160, 192)
    assert reports[64]["tile_px"] == 64 and reports[64]["overlap_px"] == 16
    assert reports[128]["seams"]["pixels"] > 0 and reports[128]["elsewhere"]["pixels"] > 0
    assert reports[128]["seams"]["mae"] < reports[64]["seams"]["mae"], reports
    assert reports[128]["seams"]["psnr_db"] > 22 and reports[128]["elsewhere"]["psnr_db"] > 22, reports
    assert torch.equal(codec.decode(zw, tile=4096), whole)        # a tile larger than the image: not tiled


def test_memory_plan_picks_tiles_only_when_the_budget_needs_them(sd_vae_folder, photos, tmp_path):
    from PIL import Image

    from jobkit.config import config_from_dict
    from vosr.checkpoint import save_checkpoint
    from vosr.model import build_dit
    from vosr.upscaler import Upscaler

    cfg = config_from_dict({}, ["autoencoder.name=sd21", f"autoencoder.path={sd_vae_folder}",
                                "model.hidden_size=32", "model.depth=1", "model.num_heads=2"])
    torch.manual_seed(0)
    model = build_dit(cfg, student=True)
    save_checkpoint(str(tmp_path / "ckpt"), cfg, model)
    roomy = Upscaler(str(tmp_path / "ckpt"), device="cpu", memory_budget_mb=10_000_000)
    lr = Image.open(photos[1]).convert("RGB").resize((96, 80), Image.BICUBIC)      # 384 x 320 px output
    opts = roomy.resolve()
    assert roomy.fit_memory(lr.size, opts) == opts                                   # fits: untouched
    whole_plan = roomy.memory_plan(lr.size, opts)
    base = whole_plan.weights + whole_plan.pixels + whole_plan.latents
    # a budget the autoencoder pass does not fit but the (narrow) DiT does: only the autoencoder is tiled
    tight = roomy
    tight.memory_budget = base + whole_plan.stages["autoencoder"] // 2
    assert base + max(whole_plan.stages["dit"], whole_plan.stages["semantic"]) < tight.memory_budget
    fitted = tight.fit_memory(lr.size, tight.resolve())
    assert 0 < fitted.vae_tile < 384 and fitted.tile_size == 0
    tiled_plan = tight.memory_plan(lr.size, fitted)
    assert tiled_plan.stages["autoencoder"] < whole_plan.stages["autoencoder"] / 2
    assert tiled_plan.peak <= tight.memory_budget
    # a budget below even the DiT's need: the DiT is tiled too, and the cost plan sees the tiles
    tiny = Upscaler(str(tmp_path / "ckpt"), device="cpu", memory_budget_mb=1)
    with pytest.warns(UserWarning, match="over the memory budget"):
        squeezed = tiny.fit_memory(lr.size, tiny.resolve())
    assert 0 < squeezed.tile_size < 384 and tiny.plan(lr.size, tiny.resolve()).tiles > 1
    b = tight.upscale(lr, seed=1)
    assert b.size == (384, 320) and tight.last_options == fitted.replace(seed=1)
    off = tight.upscale(lr, seed=1, tile_auto=False)
    assert tight.last_options.vae_tile == 0 and off.size == (384, 320)
    tight.memory_budget = 10 * 2**40
    assert list(tight.upscale(lr, seed=1).getdata()) == list(off.getdata())       # fits: exactly untiled
