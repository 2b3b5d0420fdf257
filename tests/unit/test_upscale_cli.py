"""`vosr upscale` as SR users expect it: files, folders, --recursive, globs, output names that never collide (or a
refusal before any work), existing outputs kept unless --overwrite, --dtype, --tile auto/off/N, exit codes 2
(usage) and 1 (runtime), and `written` equal to the files on disk. A tiny random student, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.upscale import main
from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "student", student=True)


@pytest.fixture
def photo_dir(photos, tmp_path) -> Path:
    """a.jpg and a.png (same stem), b.webp, sub/c.png and a text file."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    imgs = [Image.open(p).convert("RGB").resize((18 + i, 13), Image.BICUBIC) for i, p in enumerate(photos[:4])]
    imgs[0].save(src / "a.jpg", quality=92)
    imgs[1].save(src / "a.png")
    imgs[2].save(src / "b.webp", lossless=True)
    imgs[3].save(src / "sub" / "c.png")
    (src / "notes.txt").write_text("not an image")
    return src


def _run(capsys, *args) -> tuple[int, dict | None, str]:
    code = main([*map(str, args), "--no-progress"])
    captured = capsys.readouterr()
    try:
        summary = json.loads(captured.out)
    except ValueError:
        summary = None
    return code, summary, captured.err


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_colliding_outputs_are_refused_before_any_work(ckpt, photo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, summary, err = _run(capsys, photo_dir, out, "--checkpoint", ckpt)
    assert code == 2 and summary is None
    assert "a.jpg" in err and "a.png" in err and "--keep-ext" in err
    assert not out.exists() or _files(out) == [], "nothing may be written before the refusal"
    # whole input names: cannot collide; written equals the files on disk
    code, summary, _ = _run(capsys, photo_dir, out, "--checkpoint", ckpt, "--keep-ext")
    assert code == 0 and summary["written"] == 3 == summary["inputs"]
    assert _files(out) == ["a.jpg.png", "a.png.png", "b.webp.png"]
    assert Image.open(out / "a.jpg.png").size == (72, 52)


def test_recursive_globs_suffix_ext_and_overwrite(ckpt, photo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (photo_dir / "a.jpg").unlink()
    code, summary, _ = _run(capsys, photo_dir, out, "--checkpoint", ckpt, "-r", "--suffix", "_x4", "--ext", "webp")
    assert code == 0 and summary["written"] == 3
    assert _files(out) == ["a_x4.webp", "b_x4.webp", "sub/c_x4.webp"]          # the tree is mirrored
    assert Image.open(out / "sub" / "c_x4.webp").format == "WEBP"
    before = {p: (out / p).stat().st_mtime_ns for p in _files(out)}
    # a rerun keeps existing outputs; --overwrite replaces them
    code, summary, _ = _run(capsys, photo_dir, out, "--checkpoint", ckpt, "-r", "--suffix", "_x4", "--ext", "webp")
    assert code == 0 and summary["written"] == 0 and summary["skipped_existing"] == 3
    assert {p: (out / p).stat().st_mtime_ns for p in _files(out)} == before
    code, summary, _ = _run(capsys, photo_dir, out, "--checkpoint", ckpt, "-r", "--suffix", "_x4", "--ext", "webp",
                            "--overwrite")
    assert summary["written"] == 3 and all((out / p).stat().st_mtime_ns > t for p, t in before.items())
    # a glob (quoted, as the shell leaves it) and several inputs; ** walks sub-folders with --recursive
    g = tmp_path / "g"
    code, summary, _ = _run(capsys, str(photo_dir / "*.png"), photo_dir / "b.webp", g, "--checkpoint", ckpt,
                            "--ext", "jpg")
    assert code == 0 and _files(g) == ["a.jpg", "b.jpg"] and summary["written"] == 2 == len(_files(g))
    code, summary, _ = _run(capsys, str(photo_dir / "**" / "*.png"), tmp_path / "g2", "-r", "--checkpoint", ckpt)
    assert code == 0 and _files(tmp_path / "g2") == ["a.png", "sub/c.png"]
    # a pattern matching nothing, a missing input: usage errors
    assert _run(capsys, str(photo_dir / "*.tif"), g, "--checkpoint", ckpt)[0] == 2
    assert _run(capsys, photo_dir / "missing.png", g, "--checkpoint", ckpt)[0] == 2


def test_outputs_beside_the_inputs_never_replace_or_reread_them(ckpt, photo_dir, capsys):
    (photo_dir / "a.jpg").unlink()
    code, _, err = _run(capsys, photo_dir, photo_dir, "--checkpoint", ckpt)
    assert code == 2 and "replace an input" in err
    code, summary, _ = _run(capsys, photo_dir, photo_dir, "--checkpoint", ckpt, "--suffix", "_x4")
    assert code == 0 and summary["written"] == 2
    # the rerun does not upscale a_x4.png again (it is a's output), so nothing new appears
    code, summary, _ = _run(capsys, photo_dir, photo_dir, "--checkpoint", ckpt, "--suffix", "_x4")
    assert code == 0 and summary["written"] == 0 and summary["skipped_as_outputs"] == 2
    assert sorted(p.name for p in photo_dir.iterdir() if p.is_file()) == [
        "a.png", "a_x4.png", "b.webp", "b_x4.png", "notes.txt"]


def test_dtype_precision_and_fp16_refusal(ckpt, photos, tmp_path, capsys):
    src = tmp_path / "p.png"
    Image.open(photos[0]).convert("RGB").resize((24, 20), Image.BICUBIC).save(src)
    code, _, err = _run(capsys, src, tmp_path / "h", "--checkpoint", ckpt, "--dtype", "fp16", "--device", "cpu")
    assert code == 2 and "fp16 needs a CUDA device" in err and not (tmp_path / "h").exists()
    assert _run(capsys, src, tmp_path / "f", "--checkpoint", ckpt)[0] == 0
    code, summary, _ = _run(capsys, src, tmp_path / "b", "--checkpoint", ckpt, "--dtype", "bf16")
    assert code == 0 and summary["dtype"] == "bf16"
    f32 = np.asarray(Image.open(tmp_path / "f" / "p.png")).astype(np.float64)
    b16 = np.asarray(Image.open(tmp_path / "b" / "p.png")).astype(np.float64)
    psnr = 10 * np.log10(255 ** 2 / max(((f32 - b16) ** 2).mean(), 1e-12))
    assert psnr > 35, psnr                               # the same picture, within bf16's rounding


def test_tile_auto_off_and_runtime_errors(ckpt, photos, tmp_path, capsys):
    src = tmp_path / "p.png"
    Image.open(photos[1]).convert("RGB").resize((40, 36), Image.BICUBIC).save(src)
    code, summary, _ = _run(capsys, src, tmp_path / "whole", "--checkpoint", ckpt)
    assert code == 0 and "auto_tiled" not in summary and summary["options"]["tile_auto"] is True
    # a budget far below what the untiled run needs: tiles are chosen (and said), the result stays the picture
    code, summary, _ = _run(capsys, src, tmp_path / "tiled", "--checkpoint", ckpt, "--memory-budget-mb", "1")
    assert code == 0 and list(summary["auto_tiled"]) == ["tile 128 px, autoencoder tile 0 px"]
    whole = np.asarray(Image.open(tmp_path / "whole" / "p.png")).astype(np.float64)
    tiled = np.asarray(Image.open(tmp_path / "tiled" / "p.png")).astype(np.float64)
    assert whole.shape == tiled.shape == (144, 160, 3)
    assert 10 * np.log10(255 ** 2 / ((whole - tiled) ** 2).mean()) > 25
    code, summary, _ = _run(capsys, src, tmp_path / "off", "--checkpoint", ckpt, "--memory-budget-mb", "1",
                            "--tile", "off")
    assert code == 0 and "auto_tiled" not in summary
    assert np.array_equal(np.asarray(Image.open(tmp_path / "off" / "p.png")).astype(np.float64), whole)
    # a damaged checkpoint fails at run time: exit 1, one error line
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(ckpt).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\0" * 64)
    (bad / "ema_model.safetensors").unlink(missing_ok=True)
    code, summary, err = _run(capsys, src, tmp_path / "x", "--checkpoint", bad)
    assert code == 1 and summary is None and err.startswith("error: ") and err.count("\n") == 1
    assert _run(capsys, src, "--checkpoint", ckpt)[0] == 2          # no output folder given
    assert _run(capsys, src, tmp_path / "y", "--checkpoint", tmp_path / "nowhere")[0] == 2
