"""The authors' released VOSR models, imported (vosr/released.py), checked against the authors' own code.

The reference implementation (../shared/reference/VOSR) is imported by tests/helpers/reference.py; every test here
that needs it skips with the reason when it is absent. Models are the released configurations
(configs/train_yml/*) with tiny widths and depths and random weights, saved the way the authors' training script
saves them (a safetensors state dict with the RoPE buffers, args.json beside it). Compared, with the same weights and
inputs: the DiT teacher and student forward, the guided multi-step and the one-step samplers, the light SD2.1
decoder and the 2D Qwen-Image VAE, and whole upscales through `vosr upscale` against the reference's sampling
code at the same seed. The measured differences are printed (pytest -s) and listed in docs/method.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import reference as R
from vosr.released import ReleasedModelError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN_YML = R.REF / "configs" / "train_yml"
RELEASED = {  # released folder -> its training config in the reference
    "VOSR_0.5B_ms": TRAIN_YML / "multi_step" / "VOSR_0.5B.yml",
    "VOSR_0.5B_os": TRAIN_YML / "one_step" / "VOSR_0.5B.yml",
    "VOSR_1.4B_ms": TRAIN_YML / "multi_step" / "VOSR_1.4B.yml",
    "VOSR_1.4B_os": TRAIN_YML / "one_step" / "VOSR_1.4B.yml",
}
SMALL = {"dim": 128, "depth": 2, "num_heads": 2, "dinov2_size": 56}   # head dim 64 as released; 4x4 DINO tokens


@pytest.fixture(scope="module")
def ref():
    reason = R.unavailable()
    if reason:
        pytest.skip(reason)
    with R.eager():
        yield R.load()


def released_args(name: str, **over) -> dict:
    """args.json as the authors' training script writes it: the YAML's keys plus what the script adds."""
    args = yaml.safe_load(RELEASED[name].read_text())
    args.update(SMALL)
    args.update(over)
    args.update({"exp_name": f"test_{name}", "output_dir": f"exp_vosr/test_{name}",
                 "train_dataset_txt_paths_list": [], "train_dataset_prob_paths_list": []})
    return args


def reference_dit(ref, args: dict, student: bool, seed: int):
    """The authors' LightningDiT built as their inference scripts build it, every parameter random."""
    c = 4 if args["ae_type"] == "sd2" else 16
    m = ref.dit.LightningDiT(input_size=args["resolution"] // 8, patch_size=args["patch_size"], in_channels=2 * c,
                             out_channels=c, hidden_size=args["dim"], depth=args["depth"],
                             num_heads=args["num_heads"], mlp_ratio=args["mlp_ratio"], z_dims=args["enc_dim"],
                             encdim_ratio=args["encdim_ratio"], auxiliary_time_cond=student,
                             use_qknorm=args["use_qknorm"], use_swiglu=args["use_swiglu"], use_rope=args["use_rope"],
                             use_rmsnorm=args["use_rmsnorm"], wo_shift=args["wo_shift"],
                             num_fused_layers=len(args["layer_dinov2b_list"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():   # the zero-initialised final layer too, so outputs depend on every weight
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def write_release(folder: Path, args: dict, ema, plain=None) -> Path:
    """A released folder: args.json + checkpoints/ema_model.safetensors (+ model.safetensors), state dicts saved
    as the training script saves them (RoPE buffers included)."""
    from safetensors.torch import save_file

    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(args, indent=4))
    save_file({k: v.cpu().clone() for k, v in ema.state_dict().items()}, str(folder / "checkpoints" /
                                                                             "ema_model.safetensors"))
    if plain is not None:
        save_file({k: v.cpu().clone() for k, v in plain.state_dict().items()}, str(folder / "checkpoints" /
                                                                                   "model.safetensors"))
    return folder


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# --- the DiT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RELEASED))
def test_imported_dit_forward_equals_the_reference(ref, tmp_path, name):
    from vosr.checkpoint import load_checkpoint

    args = released_args(name)
    student = name.endswith("_os")
    ema, plain = reference_dit(ref, args, student, 1), reference_dit(ref, args, student, 2)
    folder = write_release(tmp_path / name, args, ema, plain)
    model, cfg, meta = load_checkpoint(str(folder))
    rec = meta["extra"]["imported"]
    assert meta["is_student"] is student and rec["weights"] == "ema" and cfg.model.rope_arithmetic == "float32"
    assert rec["rope_tables"] == {"stored": True, "grid": 32, "max_abs_diff": 0.0, "bit_identical": True}
    c = model.latent_channels
    g = torch.Generator().manual_seed(3)
    diffs = {}
    for grid in (32, 8, 12):   # the training grid (stored RoPE tables), then the reference's dynamic tables
        x = torch.randn(2, 2 * c, 2 * grid, 2 * grid, generator=g)
        t = torch.rand(2, generator=g)
        r = t * torch.rand(2, generator=g) if student else None
        z = torch.randn(2, 16, args["enc_dim"], generator=g)
        with torch.no_grad():
            want = ema.forward_flexible(x, t, r, [z])
            if grid == 32:
                assert torch.equal(want, ema(x, t, r, [z]))   # their fixed-size forward: the same at this grid
            got = model(x[:, c:], t, x[:, :c], z, r=r)
        diffs[grid] = _diff(got, want)
        assert float(want.abs().max()) > 0.1
    print(f"{name}: max |diff| teacher/student forward per token grid {diffs}")
    assert diffs[32] == 0.0 and max(diffs.values()) <= 1e-6
    # the project's default float64 RoPE arithmetic is what the float32 tables remove (~1e-6)
    model.rope_arithmetic = "float64"
    model._rope_cache.clear()
    with torch.no_grad():
        off = _diff(model(x[:, c:], t, x[:, :c], z, r=r), want)
    print(f"{name}: with the float64 RoPE arithmetic instead: max |diff| {off:.3g} (12 x 12 grid)")
    assert 0 < off < 2e-5
    # EMA first; use_ema=False reads model.safetensors
    plain_model, _, plain_meta = load_checkpoint(str(folder), use_ema=False)
    assert plain_meta["extra"]["imported"]["weights"] == "model"
    with torch.no_grad():
        assert _diff(plain_model(x[:, c:], t, x[:, :c], z, r=r), plain.forward_flexible(x, t, r, [z])) == 0.0


def test_samplers_equal_the_reference(ref, tmp_path):
    """Guided multi-step (1 and 25 linear Euler steps, s = -0.5, weak strength mean([0.05, 0.25])) and the one-step
    sampler, from the same noise."""
    from vosr import flow
    from vosr.checkpoint import load_checkpoint

    stub = types.SimpleNamespace(device=torch.device("cpu"))
    diffs = {}
    for name in ("VOSR_0.5B_ms", "VOSR_0.5B_os"):
        args = released_args(name)
        student = name.endswith("_os")
        net = reference_dit(ref, args, student, 5)
        model, cfg, _ = load_checkpoint(str(write_release(tmp_path / name, args, net)))
        net.forward = net.forward_flexible   # as their inference scripts do
        sampler = ref.sampler.VOSR(time_dist=args["time_dist"], cfg_ratio=args["cfg_ratio"], cfg_scale=-0.5,
                                   interp_type=args["interp_type"], accelerator=stub, args=argparse.Namespace(**args))
        g = torch.Generator().manual_seed(7)
        lq = torch.randn(1, 4, 16, 16, generator=g)
        sem = torch.randn(1, 16, args["enc_dim"], generator=g)
        for steps in ((1, 25) if not student else (1, 2)):
            torch.manual_seed(11)
            noise = torch.randn_like(lq)
            torch.manual_seed(11)          # the reference draws the same noise from the global generator
            with torch.no_grad():
                if student:
                    want = sampler.sample_onestep(net, lq, venc_fea=[sem], n_steps=steps)
                    got = flow.sample_fewstep(model, lq, sem, steps=steps, noise=noise)
                else:
                    want = sampler.sample_multistep_fm(net, lq, venc_fea=[sem], n_steps=steps)
                    got = flow.sample_multistep(model, lq, sem, steps=steps, guidance_scale=-0.5,
                                                weak_strength=cfg.flow.weak_strength, noise=noise)
            diffs[f"{name} {steps} step(s)"] = _diff(got, want)
            assert float(want.abs().max()) > 0.5
    print(f"samplers: max |diff| {diffs}")
    assert cfg.flow.weak_strength == pytest.approx(0.15)
    assert max(diffs.values()) <= 1e-5


# --- encoders -----------------------------------------------------------------------------------------------------

def _randomise_norms(module: torch.nn.Module, seed: int) -> None:
    """GroupNorm/RMSNorm gains and biases away from 1/0, so a wrong norm placement shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim and "bias" not in n
                        else 0.1 * torch.randn(p.shape, generator=g))


LIGHT_CONFIG = {"in_channels": 4, "out_channels": 3, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2}


def _reference_light_decoder(ref, path: Path):
    torch.manual_seed(0)
    dec = ref.light_decoder.LightDecoder(in_channels=4, out_channels=3, block_out_channels=(32, 32, 64, 64),
                                         layers_per_block=2).eval()
    _randomise_norms(dec, 1)
    torch.save({"config": LIGHT_CONFIG, "model_state_dict": dec.state_dict()}, path)
    return dec


def test_light_decoder_equals_the_reference_and_loads_without_unpickling(ref, tmp_path):
    from vosr.encoders.light_decoder import LightDecoderError, convert_light_decoder, load_light_decoder

    pth = tmp_path / "sd21_lwdecoder.pth"
    dec = _reference_light_decoder(ref, pth)
    ours, config, sha = load_light_decoder(pth)
    assert config == LIGHT_CONFIG and sha == hashlib.sha256(pth.read_bytes()).hexdigest()
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = dec(z)
        got = ours(z)
        conv, _, _ = load_light_decoder(convert_light_decoder(pth, tmp_path / "lw.safetensors"))
        got_st = conv(z)
    print(f"light decoder: max |diff| {_diff(got, want)} (.pth), {_diff(got_st, want)} (safetensors)")
    assert got.shape == (1, 3, 64, 96) and _diff(got, want) <= 1e-5 and _diff(got_st, want) <= 1e-5
    # a file holding anything but tensors and plain containers is refused, not unpickled
    torch.save({"config": LIGHT_CONFIG, "model_state_dict": dec.state_dict(), "extra": argparse.Namespace(a=1)},
               tmp_path / "evil.pth")
    with pytest.raises(LightDecoderError, match="weights_only"):
        load_light_decoder(tmp_path / "evil.pth")


def _reference_qwen2d(ref, folder: Path):
    torch.manual_seed(0)
    vae = ref.qwen_vae.AutoencoderKLQwenImage2D(base_dim=8, z_dim=16,   # the released config.json names both lists
                                                latents_mean=torch.linspace(-1, 1.5, 16).tolist(),
                                                latents_std=torch.linspace(1.1, 3.2, 16).tolist()).eval()
    _randomise_norms(vae, 3)
    vae.save_pretrained(str(folder), safe_serialization=True)
    return vae


def test_qwen_image_2d_vae_equals_the_reference(ref, tmp_path):
    from types import SimpleNamespace

    from vosr.encoders import build_autoencoder

    folder = tmp_path / "Qwen-Image-vae-2d"
    vae = _reference_qwen2d(ref, folder)
    ae_cfg = SimpleNamespace(name="qwen2d", path=str(folder), downsample=8, sample_posterior=True,
                             inference_sample_posterior=True, light_decoder="")
    codec = build_autoencoder(ae_cfg)
    assert codec.identity()["layout"] == "2D (Qwen-Image-vae-2d)" and codec.downsample == 8
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    args = argparse.Namespace(ae_type="qwen")
    with torch.no_grad():
        raw_want = vae.encode(x).latent_dist
        raw_got = codec.vae.encode(x)
        torch.manual_seed(5)     # the reference samples the posterior from the global generator
        want, mean, inv_std = ref.infer_ms._encode_latent(vae, x, args, "cpu")
        got = codec.encode(x, sample=True, generator=torch.Generator().manual_seed(5))
        dec_want = ref.infer_ms._decode_latent(vae, want, args, mean, inv_std)
        dec_got = codec.decode(want)
    d = {"posterior mean": _diff(raw_got.mean, raw_want.mean), "posterior std": _diff(raw_got.std, raw_want.std),
         "encode": _diff(got, want), "decode": _diff(dec_got, dec_want)}
    print(f"2D Qwen-Image VAE: max |diff| {d}")
    assert got.shape == (1, 16, 4, 6) and float(dec_want.std()) > 0.01
    assert max(d.values()) <= 1e-5


def test_dinov2_weights_are_found_in_a_torch_hub_cache_folder(tmp_path):
    from types import SimpleNamespace

    from vosr.encoders.semantic import _weights_path, hub_cache_candidates
    from vosr.encoders.weights import MissingWeightsError

    cfg = SimpleNamespace(name="dinov2_vitl14", path=str(tmp_path / "torch_cache"), allow_random=False)
    with pytest.raises(MissingWeightsError) as exc:
        _weights_path(cfg)
    assert "hub/checkpoints/dinov2_vitl14_pretrain.pth" in str(exc.value)
    target = tmp_path / "torch_cache" / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    (target.parent / "dinov2_vitl14_reg4_pretrain.pth").write_bytes(b"y")   # the registers model is not taken
    assert _weights_path(cfg) == target == hub_cache_candidates(tmp_path / "torch_cache", "dinov2_vitl14")[2]


# --- what is refused ------------------------------------------------------------------------------------------------

def test_what_the_project_cannot_run_is_refused_naming_the_key(tmp_path):
    from safetensors.torch import save_file

    from vosr.checkpoint import load_checkpoint

    def release(name, **over):
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        args = yaml.safe_load(RELEASED["VOSR_1.4B_ms"].read_text()) if RELEASED["VOSR_1.4B_ms"].is_file() else {}
        args.update({"dim": 64, "depth": 1, "num_heads": 1, "ae_type": "qwen", "enc_type": "dinov2l",
                     "enc_dim": 1024, "layer_dinov2b_list": [17], "resolution": 512, "use_qknorm": True,
                     "use_swiglu": True, "use_rope": True, "use_rmsnorm": True})
        args.update(over)
        (folder / "args.json").write_text(json.dumps(args))
        save_file({"t_block.1.weight": torch.zeros(1)}, str(folder / "checkpoints" / "ema_model.safetensors"))
        return str(folder)

    for over, words in (({"enc_type": "dinov2g", "enc_dim": 1536}, "enc_type=dinov2g"),
                        ({"use_swiglu": False}, "use_swiglu"), ({"ae_type": "flux"}, "ae_type"),
                        ({"enc_dim": 768}, "enc_dim 768")):
        with pytest.raises(ReleasedModelError, match=words):
            load_checkpoint(release("_".join(map(str, over.items())).replace(" ", ""), **over))
    with pytest.raises(ReleasedModelError, match="do not match the architecture"):
        load_checkpoint(release("wrong_weights"))
    # two weight files where the authors' names are absent: refused with both names, not one picked at random
    amb = tmp_path / "ambiguous"
    (amb / "a").mkdir(parents=True)
    (amb / "args.json").write_text("{}")
    for n in ("a/x.safetensors", "y.safetensors"):
        save_file({"w": torch.zeros(1)}, str(amb / n))
    with pytest.raises(ReleasedModelError, match="x.safetensors, y.safetensors"):
        load_checkpoint(str(amb))


# --- whole upscales through `vosr upscale` ----------------------------------------------------------------------------

def _reference_dinov2(file: Path, size: int):
    """torch.hub.load stand-in for the reference's load_dinov2: the DINOv2 hub code is not available here, so the
    network is timm's ViT-B/14 with the file's weights, and only the layer selection and preprocessing around it
    are the reference's (load_dinov2's forward_with_features, get_venc_features). The position grid resampling is
    checked by hand in tests/unit/test_full_scale_fidelity.py."""
    from vosr.encoders.semantic import load_vit_weights, make_vit
    from vosr.encoders.specs import DINOV2_ARCH

    vit = make_vit(DINOV2_ARCH["dinov2_vitb14"], size, True, init=False)
    load_vit_weights(vit, file)
    vit.prepare_tokens_with_masks = lambda x, masks=None: vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    return vit


@pytest.fixture(scope="module")
def release_root(ref, tmp_path_factory):
    """The released layout (preset/ckpts/ of the authors' README) with tiny random models: two VOSR-0.5B folders,
    the SD2.1 VAE folder, sd21_lwdecoder.pth and torch_cache/ with DINOv2 ViT-B/14 in the original release layout."""
    from diffusers import AutoencoderKL

    from vosr.encoders.semantic import make_vit
    from vosr.encoders.specs import DINOV2_ARCH

    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
                        scaling_factor=0.18215)
    vae.save_pretrained(str(root / "stable-diffusion-2-1-base" / "vae"), safe_serialization=True)
    _reference_light_decoder(ref, root / "sd21_lwdecoder.pth")
    vit = make_vit(DINOV2_ARCH["dinov2_vitb14"], 518, True, init=False)   # the released grid: 37 x 37 at 518 px
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * (0.02 if v.ndim > 1 else 0.1) + (1.0 if k.endswith(
        ("norm1.weight", "norm2.weight", "norm.weight")) else 0.0) for k, v in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 768)                    # original facebookresearch/dinov2 layout
    hub = root / "torch_cache" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(state, hub / "dinov2_vitb14_pretrain.pth")
    del vit, state
    for name in ("VOSR_0.5B_ms", "VOSR_0.5B_os"):
        args = released_args(name)
        write_release(root / name, args, reference_dit(ref, args, name.endswith("_os"), 21),
                      reference_dit(ref, args, name.endswith("_os"), 22))
    return root


def reference_upscale(ref, root: Path, name: str, lr: Image.Image, cli: dict) -> Image.Image:
    """The authors' inference for one image with their own functions (inference_vosr*.py), the global generator
    seeded with 42 just before the image (their main() seeds before building the models, whose initialisation then
    draws from it; see docs/method.md s8)."""
    from safetensors.torch import load_file
    from torchvision import transforms

    student = name.endswith("_os")
    infer = ref.infer_os if student else ref.infer_ms
    args = argparse.Namespace(**{**json.loads((root / name / "args.json").read_text()), **cli})
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(root / "stable-diffusion-2-1-base"), subfolder="vae").eval()
    ckpt = torch.load(root / "sd21_lwdecoder.pth", map_location="cpu")
    c = ckpt["config"]
    light = ref.light_decoder.LightDecoder(in_channels=c["in_channels"], out_channels=c["out_channels"],
                                           block_out_channels=tuple(c["block_out_channels"]),
                                           layers_per_block=c["layers_per_block"])
    light.load_state_dict(ckpt["model_state_dict"])
    light.eval()
    hub_load = torch.hub.load
    torch.hub.load = lambda *a, **k: _reference_dinov2(root / "torch_cache" / "hub" / "checkpoints" /
                                                      "dinov2_vitb14_pretrain.pth", args.dinov2_size)
    try:
        venc = infer.load_dinov2(args, "cpu")
    finally:
        torch.hub.load = hub_load
    net = reference_dit(ref, args.__dict__, student, 0)
    net.load_state_dict(load_file(str(root / name / "checkpoints" / "ema_model.safetensors")), strict=False)
    net.forward = net.forward_flexible
    sampler = ref.sampler.VOSR(time_dist=args.time_dist, cfg_ratio=args.cfg_ratio, cfg_scale=args.cfg_scale,
                               interp_type=args.interp_type, accelerator=types.SimpleNamespace(device="cpu"),
                               t_start=args.t_start, t_end=args.t_end, args=args)
    w, h = lr.size
    input_img = lr.resize((w * args.upscale, h * args.upscale), Image.BICUBIC)
    lq = transforms.ToTensor()(input_img).unsqueeze(0) * 2.0 - 1.0
    torch.manual_seed(args.seed)
    with torch.no_grad():
        if args.tile_size > 0:
            if student:
                sr = infer.tiled_latent_inference(net, vae, venc, lq, args, device="cpu", light_decoder=light)
            else:
                sr = infer.tiled_latent_inference(net, sampler, vae, venc, lq, args, device="cpu",
                                                  light_decoder=light)
        else:
            lat, mean, std = infer._encode_latent(vae, lq, args, "cpu")
            z = infer.get_venc_features(venc, lq, args)
            fn = sampler.sample_onestep if student else sampler.sample_multistep_fm
            sr = infer._decode_latent(vae, fn(net, lat, n_steps=args.infer_steps, venc_fea=z), args, mean, std, light)
    out = transforms.ToPILImage()(sr[0].cpu() * 0.5 + 0.5)
    return infer.adain_color_fix(out, input_img)


def _lr_image(size: tuple[int, int], seed: int) -> Image.Image:
    from tests.conftest import dev_photos

    photo = Image.open(dev_photos()[seed % len(dev_photos())]).convert("RGB")
    return photo.resize(size, Image.BICUBIC)


def _compare(ours: Image.Image, want: Image.Image) -> tuple[int, float]:
    a, b = np.asarray(ours, dtype=np.int16), np.asarray(want, dtype=np.int16)
    assert a.shape == b.shape
    d = np.abs(a - b)
    return int(d.max()), float((d > 0).mean())


def test_vosr_upscale_of_a_released_multistep_folder_gives_the_reference_pixels(ref, release_root, tmp_path):
    """VOSR-0.5B-ms with the RealSR preset (25 guided steps, s = -0.5, light decoder, AdaIN) on a 32 x 32 LR."""
    from inference.upscale import main

    src = tmp_path / "in"
    src.mkdir()
    lr = _lr_image((32, 32), 0)
    lr.save(src / "img.png")
    rc = main([str(src), str(tmp_path / "out"), "--checkpoint", str(release_root / "VOSR_0.5B_ms"), "--mode",
               "multistep", "--set", "inference.preset=realsr", "--device", "cpu", "--no-progress"])
    assert rc == 0
    ours = Image.open(tmp_path / "out" / "img.png").convert("RGB")
    want = reference_upscale(ref, release_root, "VOSR_0.5B_ms", lr,
                             {"cfg_scale": -0.5, "infer_steps": 25, "tile_size": 0, "tile_overlap": 4,
                              "upscale": 4, "seed": 42, "align_method": "adain"})
    worst, frac = _compare(ours, want)
    print(f"vosr upscale VOSR_0.5B_ms (RealSR preset) vs reference: max |diff| {worst} grey level(s), "
          f"{100 * frac:.3f}% of values differ")
    assert ours.size == (128, 128) and np.asarray(ours).std() > 5
    assert worst <= 1


def test_vosr_upscale_of_a_released_onestep_folder_from_the_hub_cache_tiled(ref, release_root, tmp_path,
                                                                            monkeypatch):
    """VOSR-0.5B-os named as hf://CSWRY/VOSR/VOSR_0.5B_os, read from a pre-populated Hugging Face cache with
    HF_HUB_OFFLINE=1, tiled (64 px tiles, 32 px overlap: 3 x 3 tiles) against the reference's tiled one-step path."""
    import huggingface_hub

    from inference.upscale import main

    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf"
    repo = cache / "models--CSWRY--VOSR"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for entry in release_root.iterdir():      # the cache's snapshot entries are links (to blobs) as in a real one
        (snap / entry.name).symlink_to(entry)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    real = huggingface_hub.snapshot_download

    def spy(**kw):     # records what is asked for, then the real function answers from the cache
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    src = tmp_path / "in"
    src.mkdir()
    lr = _lr_image((32, 32), 1)
    lr.save(src / "img.png")
    rc = main([str(src), str(tmp_path / "out"), "--checkpoint", "hf://CSWRY/VOSR/VOSR_0.5B_os", "--set",
               "inference.preset=realsr", "--tile", "64", "--tile-overlap", "32", "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    # only the named folder was asked for, from the cache
    assert calls and all(c["allow_patterns"] == ["VOSR_0.5B_os", "VOSR_0.5B_os/*"] and c["local_files_only"]
                         for c in calls)
    ours = Image.open(tmp_path / "out" / "img.png").convert("RGB")
    want = reference_upscale(ref, release_root, "VOSR_0.5B_os", lr,
                             {"infer_steps": 1, "tile_size": 64, "tile_overlap": 32, "upscale": 4, "seed": 42,
                              "align_method": "adain"})
    worst, frac = _compare(ours, want)
    print(f"vosr upscale hf://CSWRY/VOSR/VOSR_0.5B_os (tiled 3x3) vs reference: max |diff| {worst} grey "
          f"level(s), {100 * frac:.3f}% of values differ")
    assert ours.size == (128, 128) and np.asarray(ours).std() > 5
    assert worst <= 1
    # not in the cache and offline: a clear error, nothing downloaded
    assert main([str(src), str(tmp_path / "out2"), "--checkpoint", "hf://CSWRY/VOSR/VOSR_1.4B_os",
                 "--no-progress"]) == 2


def test_vosr_import_writes_a_checkpoint_folder_with_every_source_sha256(release_root, tmp_path):
    from jobkit.cli import main as cli
    from vosr.checkpoint import load_checkpoint

    out = tmp_path / "imported"
    assert cli(["import", str(release_root / "VOSR_0.5B_ms"), str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    files = {f["path"]: f["sha256"] for f in meta["extra"]["imported"]["files"]}
    for rel in ("args.json", "checkpoints/ema_model.safetensors", "checkpoints/model.safetensors"):
        assert files[rel] == hashlib.sha256((release_root / "VOSR_0.5B_ms" / rel).read_bytes()).hexdigest()
    manifest = json.loads((out / "_vosr_files.json").read_text())
    assert manifest["imported"] == files
    assert manifest["files"] == {n: (out / n).stat().st_size for n in ("model.safetensors", "ema_model.safetensors",
                                                                       "config.json")}
    a, _, _ = load_checkpoint(str(out))
    b, _, _ = load_checkpoint(str(release_root / "VOSR_0.5B_ms"))
    a_plain, _, _ = load_checkpoint(str(out), use_ema=False)
    b_plain, _, _ = load_checkpoint(str(release_root / "VOSR_0.5B_ms"), use_ema=False)
    for x, y in ((a, b), (a_plain, b_plain)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    assert not torch.equal(a.state_dict()["t_block.1.weight"], a_plain.state_dict()["t_block.1.weight"])
    assert a.rope_arithmetic == "float32"


# --- benchmarks/released_quality.py ---------------------------------------------------------------------------------

def _benchmark_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "released_quality.py"
    spec = importlib.util.spec_from_file_location("released_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_released_quality_numbers_are_the_papers_table1():
    paper = Path(__file__).resolve().parents[3] / "shared" / "paper" / "vosr-paper.txt"
    if not paper.is_file():
        pytest.skip(f"the paper's text is not at {paper}")
    import re

    rows = [line.split() for line in paper.read_text().splitlines() if re.match(r"VOSR-\d\.\dB-(ms|os) [-\d.]+", line)]
    table = [(r[0], [float(v) for v in r[1:11]]) for r in rows if len(r) == 11][:12]   # Table 1: 3 datasets x 4
    mod = _benchmark_module()
    ours = [(m, vals) for ds in ("LSDIR", "ScreenSR", "RealSR")
            for m, vals in sorted(mod.PAPER_TABLE1[ds].items(), key=lambda kv: (kv[0][-2:], kv[0]))]
    assert len(table) == 12 and table == ours


def test_released_quality_runs_the_evaluation_runner_on_a_released_folder(release_root, tmp_path, photos, capsys):
    """The one command for whoever has the weights, run here on the tiny fake release: a RealSR-layout folder of
    two _HR / _LR4 pairs, VOSR-0.5B-os with the RealSR preset, the paper's columns printed beside Table 1's."""
    bench = tmp_path / "RealSR" / "Canon" / "Test" / "4"
    bench.mkdir(parents=True)
    for i, p in enumerate(photos[:2]):
        hr = Image.open(p).convert("RGB").resize((128, 128), Image.BICUBIC)
        hr.save(bench / f"Canon_00{i}_HR.png")
        hr.resize((32, 32), Image.BICUBIC).save(bench / f"Canon_00{i}_LR4.png")
    mod = _benchmark_module()
    out = tmp_path / "out"
    assert mod.main(["--model", str(release_root / "VOSR_0.5B_os"), "--realsr", str(bench), "--crop", "0",
                     "--device", "cpu", "--out", str(out), "--set", "eval.iqa_metrics=[]"]) == 0
    text = capsys.readouterr().out
    assert "RealSR (2 images, VOSR-vosr-0.5b-os" in text and "vs paper Table 1 VOSR-0.5B-os" in text
    res = json.loads((out / "released_quality.json").read_text())
    cols = res["results"][0]["columns"]
    assert res["name"] == "VOSR-0.5B-os" and cols["psnr"]["paper"] == 25.4189
    assert cols["psnr"]["diff"] == pytest.approx(cols["psnr"]["ours"] - 25.4189)
    assert cols["lpips"]["ours"] is None     # not computed here (no metric weights): n/a, not a number
    files = {f["path"] for f in res["imported"]["files"]}
    assert files == {"args.json", "checkpoints/ema_model.safetensors"}


def test_released_folders_start_training_and_distillation(release_root):
    """train.init_from and distill_job.teacher take a released folder (vosr.checkpoint.load_checkpoint)."""
    from jobkit.config import config_from_dict
    from training.objectives import DistillObjective, PretrainObjective
    from vosr.checkpoint import load_checkpoint
    from vosr.model import build_dit

    folder = str(release_root / "VOSR_0.5B_ms")
    teacher, _, meta = load_checkpoint(folder)
    data = {k: v for k, v in meta["config"].items() if k != "inference"}
    cfg = config_from_dict({**data, "distill_job": {"teacher": folder}})
    model = build_dit(cfg)
    info = PretrainObjective(cfg, torch.device("cpu")).init_from(model, folder)
    assert info["init_from"] == folder and info["train_grid"] == 32
    want = teacher.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    student = DistillObjective(cfg, torch.device("cpu")).build_model()
    assert student.is_student and all(torch.equal(student.state_dict()[k], v) for k, v in want.items())
