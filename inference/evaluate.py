"""Evaluate SR settings on a benchmark folder: `python inference/evaluate.py --config configs/eval/tiny.yaml`.

Stages:
1. pairs      - paired folders as benchmarks publish them (HR/ + LR/, test_HR/ + test_LR/ with DRealSR's _x1/_x4
                names, or one folder of RealSR's _HR/_LR4 files; matched by name without those suffixes) or HR only,
                degraded with eval.degrade_preset (seeded per image from run.seed); optional centre crop (paper s4:
                512 GT / 128 LR, the default of the real presets).
2. settings   - rows: bicubic, the one-step student (inference.checkpoint), the multi-step teacher (eval.teacher)
                at each guidance scale of eval.guidance_sweep, and the peers (eval.peers, inference/peers.py).
                Any subset runs: with no checkpoint it is bicubic and the peers.
3. metrics    - PSNR / SSIM on Y (BT.601, border = scale; vosr.metrics), ST-LPIPS and NIQE from local files
                (inference/iqa_local.py), the pyiqa metrics when the iqa extra and their cached weights are present;
                each metric that cannot run is listed as skipped with the reason, each that ran with its file.
4. report     - summary.json, table.md laid out like the paper's Table 1, per_image.csv, guidance_sweep.png like
                its Fig. 4.

eval.hr_dir / eval.lr_dir may be s3:// prefixes (listed and read through vosr.storage), the checkpoints s3:// folders
(inference/model_uri.py caches them locally), and eval.output an s3:// prefix: the report is written to a local
temporary folder, then every file is uploaded atomically and the summary names the s3:// URIs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from vosr.imageio import IMAGE_SUFFIXES  # the one list of decoded formats

# Table 1 column order of the paper: (column title, metric key, higher is better, full-reference)
TABLE_COLUMNS = [
    ("PSNR↑", "psnr", True), ("SSIM↑", "ssim", True), ("LPIPS↓", "lpips", False),
    ("ST-LPIPS↓", "stlpips", False), ("DISTS↓", "dists", False),
    ("AFINE-FR↓", "afine", False), ("NIQE↓", "niqe", False), ("MUSIQ↑", "musiq", True),
    ("MANIQA↑", "maniqa", True), ("AFINE-NR↓", "afine_nr", False), ("TOPIQ-NR↑", "topiq_nr", True),
]
FULL_REFERENCE = {"psnr", "ssim", "lpips", "stlpips", "dists", "afine"}
GROUP_KIND = {"Baseline": "bicubic", "Multi-step": "teacher", "One-step": "student", "Peer": "peer"}


@dataclasses.dataclass
class Pair:
    name: str
    hr: Any   # PIL RGB
    lr: Any   # PIL RGB, HR size / scale


# --- stage 1: pairs ------------------------------------------------------------------------------------------

def _endpoint(cfg) -> str:
    from inference.model_uri import endpoint_url_for

    return endpoint_url_for(cfg)


def _images(folder: str, endpoint: str = "") -> dict[str, str]:
    """{file stem: path or URI} of the images directly inside `folder` (a local folder or an s3:// prefix)."""
    from vosr import storage

    if storage.is_remote(folder):
        base = folder.rstrip("/") + "/"
        files = [u for u in storage.list_files(folder, "", endpoint) if "/" not in u[len(base):]]
        return {posixpath.splitext(posixpath.basename(u))[0]: u for u in files
                if posixpath.splitext(u)[1].lower() in IMAGE_SUFFIXES}
    return {p.stem: str(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _is_dir(folder: str, endpoint: str = "") -> bool:
    """A local folder, or an s3:// prefix with at least one object below it."""
    from vosr import storage

    if storage.is_remote(folder):
        return bool(storage.list_files(folder, "", endpoint))
    return Path(folder).is_dir()


def _centre_box(w: int, h: int, cw: int, ch: int) -> tuple[int, int, int, int]:
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _load(path: str, endpoint: str = ""):
    from vosr import storage
    from vosr.imageio import decode_image

    return decode_image(storage.read_bytes(path, endpoint), max_pixels=400_000_000)


def resolve_folders(ecfg, endpoint: str = "") -> tuple[str, str | None]:
    """(HR folder, LR folder or None); local folders or s3:// prefixes alike. A benchmark folder holding HR/ + LR/
    or DRealSR's test_HR/ + test_LR/ is recognised; RealSR's single folder of _HR/_LR4 files gives (folder,
    folder) and the names tell HR from LR."""
    from vosr import storage

    hr = ecfg.hr_dir.rstrip("/") if storage.is_remote(ecfg.hr_dir) else ecfg.hr_dir
    if not _is_dir(hr, endpoint):
        raise FileNotFoundError(f"eval.hr_dir {hr} is not a folder (or an s3:// prefix holding images)")
    for hr_name, lr_name in (("HR", "LR"), ("test_HR", "test_LR")):
        if _is_dir(storage.join(hr, hr_name), endpoint):     # a benchmark folder with HR/ (and maybe LR/)
            lr_sub = storage.join(hr, lr_name)
            lr = ecfg.lr_dir or (lr_sub if _is_dir(lr_sub, endpoint) else None)
            return storage.join(hr, hr_name), lr
    if ecfg.lr_dir:
        return hr, ecfg.lr_dir
    return hr, None


def pair_key(stem: str, scale: int) -> tuple[str, str | None]:
    """(name shared by an HR/LR pair, 'HR' / 'LR' / None) from a file stem, for the published naming schemes:
    RealSR `Canon_001_HR` / `Canon_001_LR4`, DRealSR `x_x1` / `x_x4`, classic `babyx4` / `baby`."""
    for pattern, role in ((r"(.+?)[_-]?HR$", "HR"), (rf"(.+?)[_-]?LR{scale}$", "LR"), (r"(.+?)_x1$", "HR"),
                          (rf"(.+?)_?x{scale}$", "LR")):
        m = re.fullmatch(pattern, stem)
        if m:
            return m.group(1), role
    return stem, None


def split_named(files: dict[str, str], scale: int, want: str, mixed: bool) -> dict[str, str]:
    """{pair name: path}: a file marked with the role `want` is keyed by its name without the mark, any other by
    its stem; in a `mixed` folder (HR and LR side by side) the files marked with the other role are left out."""
    out: dict[str, str] = {}
    for stem, path in files.items():
        key, role = pair_key(stem, scale)
        if role == want:
            out.setdefault(key, path)
        elif role is None or not mixed:
            out.setdefault(stem, path)
    return out


def load_pairs(cfg) -> tuple[list[Pair], dict[str, Any]]:
    """Pairs at exact scale (HR = scale x LR), centre-cropped when eval.crop > 0; skipped files with reasons."""
    from vosr.degrade import degrade
    from vosr.imageio import ImageDecodeError, image_to_tensor, tensor_to_image
    from vosr.seeding import sample_seed

    ecfg, scale = cfg.eval, cfg.inference.upscale
    endpoint = _endpoint(cfg)
    hr_dir, lr_dir = resolve_folders(ecfg, endpoint)
    hr_all = _images(hr_dir, endpoint)
    roles = {pair_key(stem, scale)[1] for stem in hr_all}
    if lr_dir is None and {"HR", "LR"} <= roles:          # RealSR: _HR and _LR4 side by side in one folder
        lr_dir = hr_dir
    mixed = lr_dir == hr_dir
    hr_files = split_named(hr_all, scale, "HR", mixed) if lr_dir else hr_all
    lr_files = split_named(_images(lr_dir, endpoint), scale, "LR", mixed) if lr_dir else {}
    names = sorted(hr_files)
    if ecfg.max_images:
        names = names[:ecfg.max_images]
    info: dict[str, Any] = {"hr_dir": str(hr_dir), "lr_dir": str(lr_dir) if lr_dir else None,
                            "lr_source": "paired" if lr_dir else f"degrade:{ecfg.degrade_preset}", "scale": scale,
                            "crop": ecfg.crop, "skipped": {}}
    pairs: list[Pair] = []
    dcfg = dataclasses.replace(cfg.degrade, preset=ecfg.degrade_preset, scale=scale, resize_back=False)
    for name in names:
        try:
            hr = _load(hr_files[name], endpoint)
            if lr_dir:
                if name not in lr_files:
                    info["skipped"][name] = "no LR partner"
                    continue
                lr = _load(lr_files[name], endpoint)
                if hr.width < lr.width * scale or hr.height < lr.height * scale:
                    same = " (LR at the HR's size, as some releases ship it: give LR at 1/scale)" \
                        if lr.size == hr.size else ""
                    info["skipped"][name] = f"HR {hr.size} smaller than {scale} x LR {lr.size}{same}"
                    continue
                hr = hr.crop((0, 0, lr.width * scale, lr.height * scale))        # mod-crop to the pair
                if ecfg.crop:
                    lc = ecfg.crop // scale
                    if lr.width < lc or lr.height < lc:
                        info["skipped"][name] = f"LR {lr.size} smaller than the crop {lc}"
                        continue
                    box = _centre_box(lr.width, lr.height, lc, lc)
                    lr = lr.crop(box)
                    hr = hr.crop(tuple(v * scale for v in box))
            else:
                if ecfg.crop:
                    if hr.width < ecfg.crop or hr.height < ecfg.crop:
                        info["skipped"][name] = f"HR {hr.size} smaller than the crop {ecfg.crop}"
                        continue
                    hr = hr.crop(_centre_box(hr.width, hr.height, ecfg.crop, ecfg.crop))
                hr = hr.crop((0, 0, hr.width // scale * scale, hr.height // scale * scale))
                seed = sample_seed(cfg.run.seed, name, 0, "eval-degrade")
                lr_t, _ = degrade(image_to_tensor(hr)[None], [seed], dcfg)
                lr = tensor_to_image(lr_t[0])
        except ImageDecodeError as exc:
            info["skipped"][name] = f"decode: {exc.reason}"
            continue
        pairs.append(Pair(name, hr, lr))
    info["images"] = len(pairs)
    return pairs, info


# --- stage 2: settings -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Setting:
    label: str
    group: str          # "Multi-step", "One-step", "Peer" or "Baseline" (Table 1 grouping)
    upscaler: Any       # None for bicubic; a vosr Upscaler or an inference.peers.PeerUpscaler
    overrides: dict[str, Any]
    guidance: float | None = None


def _teacher_rows(up, cfg) -> list[Setting]:
    """Multi-step rows: the configured guidance scale, then each scale of the sweep (paper Fig. 4)."""
    steps = cfg.eval.sweep_steps or cfg.flow.steps
    scales = list(dict.fromkeys([cfg.flow.guidance_scale, *cfg.eval.guidance_sweep]))
    return [Setting(f"VOSR-{up.model_cfg.preset}-ms (s={s:g})", "Multi-step", up,
                    {"mode": "multistep", "guidance": float(s), "steps": steps}, guidance=float(s))
            for s in scales]


def _source(uri: str, folder: Path) -> str:
    """What the summary names as a model: the URI it was given when remote (s3://, models:/), else the folder."""
    return uri if "://" in uri or uri.startswith(("models:/", "runs:/")) else str(folder)


def build_settings(cfg) -> tuple[list[Setting], dict[str, str]]:
    """Bicubic, then inference.checkpoint (one-step row for a student, multi-step rows + sweep for a teacher),
    then eval.teacher's multi-step rows, then one row per eval.peers entry (loaded before any row runs, so an
    unsupported file fails fast)."""
    from inference.model_uri import resolve_model
    from vosr.upscaler import Upscaler

    settings = [Setting("Bicubic", "Baseline", None, {})]
    sources: dict[str, str] = {}
    # every row passes its mode explicitly, so inference.mode does not have to match the checkpoint's kind
    if cfg.inference.checkpoint:
        folder = resolve_model(cfg.inference.checkpoint, cfg)
        up = Upscaler(folder, cfg)
        if up.is_student:
            sources["student"] = _source(cfg.inference.checkpoint, folder)
            settings.append(Setting(f"VOSR-{up.model_cfg.preset}-os", "One-step", up, {"mode": "onestep"}))
        else:
            sources["teacher"] = _source(cfg.inference.checkpoint, folder)
            settings += _teacher_rows(up, cfg)
    if cfg.eval.teacher:
        folder = resolve_model(cfg.eval.teacher, cfg)
        up = Upscaler(folder, cfg)
        if up.is_student:
            raise ValueError(f"eval.teacher {cfg.eval.teacher} is a one-step student, not a multi-step teacher")
        sources["teacher" if "teacher" not in sources else "eval_teacher"] = _source(cfg.eval.teacher, folder)
        settings += _teacher_rows(up, cfg)
    if cfg.eval.peers:
        from inference.peers import load_peers
        from vosr.upscaler import pick_device

        device = pick_device(cfg.inference.device).type
        for peer in load_peers(list(cfg.eval.peers), cfg.inference.upscale, device, cfg.inference.tile_size,
                               cfg.inference.tile_overlap):
            settings.append(Setting(peer.name, "Peer", peer, {}))
    return settings, sources


# --- stage 3: metrics ------------------------------------------------------------------------------------------

class IQAMetrics:
    """The perceptual metrics that could be set up here, offline; the others are recorded with the reason.

    stlpips and niqe run from a local file (eval.metric_weights, else pyiqa's cache folder) through
    inference/iqa_local.py; the rest (and those two when no file is found but pyiqa is installed) through pyiqa
    with HF_HUB_OFFLINE=1, so only weights already in its cache work. `files` names what each metric ran with."""

    def __init__(self, names: list[str], device: str = "cpu", weights: list[str] | tuple[str, ...] = ()):
        from inference import iqa_local
        from inference.peers import sha256_file

        self.metrics: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.files: dict[str, dict[str, str]] = {}
        self.undefined: dict[str, int] = {}          # metric -> images where it is not defined (NaN)
        named, folders = iqa_local.parse_weight_entries(list(weights))
        names = list(dict.fromkeys([*names, *named]))
        import os

        try:
            import pyiqa

            os.environ.setdefault("HF_HUB_OFFLINE", "1")   # pyiqa: weights must already be on disk; never download
        except Exception as exc:  # noqa: BLE001 - a missing or broken optional extra
            pyiqa, pyiqa_error = None, exc
        pyiqa_names = []
        for n in names:
            path = iqa_local.find_file(n, named, folders) if n in iqa_local.LOADERS else None
            if path is None:
                pyiqa_names.append(n)
                continue
            self.files[n] = {"file": str(path), "sha256": sha256_file(path), "via": "vosr loader (iqa_local)"}
            if pyiqa is not None and path.suffix in iqa_local.PYIQA_LOADS.get(n, ()):
                try:            # pyiqa where it can load the file (ST-LPIPS .pth, NIQE .mat), else our loader
                    self.metrics[n] = pyiqa.create_metric(n, device=device, as_loss=False,
                                                          pretrained_model_path=str(path))
                    self.files[n]["via"] = "pyiqa"
                    continue
                except Exception:  # noqa: BLE001 - fall back to the documented local loader
                    pass
            try:
                self.metrics[n] = iqa_local.LOADERS[n](path, device)
            except Exception as exc:  # noqa: BLE001 - a corrupt or wrong file is reported, not fatal
                self.skipped[n] = f"local file {path} could not be loaded: {str(exc)[:160]}"
                del self.files[n]
        if not pyiqa_names:
            return
        if pyiqa is None:
            exc = pyiqa_error
            for n in pyiqa_names:
                hint = ""
                if n in iqa_local.KNOWN_FILES:
                    hint = (f"; no {' / '.join(iqa_local.KNOWN_FILES[n])} in eval.metric_weights nor in pyiqa's "
                            f"cache {iqa_local.pyiqa_cache_dir()}")
                self.skipped[n] = f"pyiqa not installed (pip install '.[iqa]'): {type(exc).__name__}{hint}"
            return
        for n in pyiqa_names:
            try:
                self.metrics[n] = pyiqa.create_metric(n, device=device, as_loss=False)
                self.files[n] = {"file": f"pyiqa cache ({iqa_local.pyiqa_cache_dir()})", "sha256": "",
                                 "via": "pyiqa"}
            except Exception as exc:  # noqa: BLE001 - missing weights surface as many error types
                self.skipped[n] = f"pyiqa metric unavailable (weights missing or unknown name): {str(exc)[:160]}"

    def __call__(self, sr, hr) -> dict[str, float]:
        if not self.metrics:
            return {}
        from vosr.imageio import image_to_tensor

        out = {}
        x = ref = None
        for name, metric in self.metrics.items():
            if self.files[name]["via"] == "pyiqa":
                if x is None:
                    x, ref = image_to_tensor(sr)[None], image_to_tensor(hr)[None]
                val = float((metric(x, ref) if name in FULL_REFERENCE else metric(x)).mean())
            else:
                val = metric(sr, hr)
            if not math.isfinite(val):
                self.undefined[name] = self.undefined.get(name, 0) + 1
            out[name] = val
        return out


def score(sr, hr, scale: int, iqa: IQAMetrics) -> dict[str, float]:
    from vosr.metrics import psnr_y, ssim_y

    return {"psnr": psnr_y(hr, sr, border=scale), "ssim": ssim_y(hr, sr, border=scale), **iqa(sr, hr)}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def evaluate_setting(setting: Setting, pairs: list[Pair], cfg, iqa: IQAMetrics, image_dir: Path | None) -> dict:
    from vosr.seeding import derive_seed
    from vosr.upscaler import bicubic_upsample

    scale = cfg.inference.upscale
    per_image: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for pair in pairs:
        if setting.upscaler is None:
            sr = bicubic_upsample(pair.lr, scale)
        else:
            seed = derive_seed(cfg.inference.seed, pair.name)   # reproducible, distinct noise per image
            sr = setting.upscaler.upscale(pair.lr, seed=seed, **setting.overrides)
        if image_dir is not None:
            folder = image_dir / _slug(setting.label)
            folder.mkdir(parents=True, exist_ok=True)
            sr.save(folder / f"{pair.name}.png")
        per_image[pair.name] = score(sr, pair.hr, scale, iqa)
    keys = sorted({k for m in per_image.values() for k in m})
    means = {k: _mean([m[k] for m in per_image.values() if k in m]) for k in keys}
    row = {"label": setting.label, "group": setting.group, "kind": GROUP_KIND.get(setting.group, setting.group),
           "guidance": setting.guidance, "options": setting.overrides, "metrics": means, "per_image": per_image,
           "seconds": round(time.perf_counter() - t0, 3)}
    if setting.group == "Peer":
        row["peer"] = setting.upscaler.describe()
    return row


# --- stage 4: report -------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict], dataset: str, skipped: dict[str, str],
                   files: dict[str, dict[str, str]] | None = None, undefined: dict[str, int] | None = None) -> str:
    """Rows grouped like Table 1 (Dataset | Setting | Method | metrics); skipped metrics shown as n/a, then which
    file each perceptual metric and each peer ran with (sha256) and why any metric was skipped."""
    head = "| Dataset | Setting | Method | " + " | ".join(c for c, _, _ in TABLE_COLUMNS) + " |"
    sep = "|" + "---|" * (3 + len(TABLE_COLUMNS))
    lines = [head, sep]
    order = {"Baseline": 0, "Peer": 1, "Multi-step": 2, "One-step": 3}
    first = True
    for row in sorted(rows, key=lambda r: order.get(r["group"], 9)):
        cells = []
        for _, key, _ in TABLE_COLUMNS:
            v = row["metrics"].get(key)
            cells.append("n/a" if v is None or not math.isfinite(v) else f"{v:.4f}")
        lines.append(f"| {dataset if first else ''} | {row['group']} | {row['label']} | " + " | ".join(cells) + " |")
        first = False
    if files:
        lines += ["", "Perceptual metrics ran with:",
                  *(f"- {k}: `{v['file']}`" + (f" (sha256 {v['sha256']})" if v.get("sha256") else "")
                    + f", via {v['via']}" for k, v in sorted(files.items()))]
    peers = [r["peer"] for r in rows if r.get("peer")]
    if peers:
        lines += ["", "Peers (kind `peer`, same crops and tiling as the VOSR rows):",
                  *(f"- {p['name']}: {p['architecture']} x{p['scale']}, {p['params']:,} parameters, `{p['path']}` "
                    f"(sha256 {p['sha256']})" for p in peers)]
    notes = [f"- {k}: {v}" for k, v in sorted(skipped.items())]
    if notes:
        lines += ["", "Skipped metrics (n/a above):", *notes]
    for k, n in sorted((undefined or {}).items()):
        lines += ["", f"{k} was undefined (NaN) on {n} image(s) and left out of those means"
                  + (" (NIQE needs at least two whole 96 x 96 blocks)." if k == "niqe" else ".")]
    lines += ["", "PSNR/SSIM on Y (YCbCr BT.601), border crop = scale. ↑ higher is better, ↓ lower is better."]
    return "\n".join(lines) + "\n"


def write_per_image_csv(rows: list[dict], path: Path) -> None:
    """One line per (row, image): row label, kind, guidance, image, then every metric (empty when not computed)."""
    import csv

    keys = [k for _, k, _ in TABLE_COLUMNS if any(k in m for r in rows for m in r["per_image"].values())]
    keys += sorted({k for r in rows for m in r["per_image"].values() for k in m} - set(keys))
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "kind", "guidance", "image", *keys])
        for r in rows:
            for name, m in sorted(r["per_image"].items()):
                w.writerow([r["label"], r["kind"], "" if r["guidance"] is None else r["guidance"], name,
                            *("" if k not in m or not math.isfinite(m[k]) else repr(float(m[k])) for k in keys)])


def sweep_plot(rows: list[dict], path: Path, title: str) -> str | None:
    """Guidance scale vs two metrics (paper Fig. 4: LPIPS and MUSIQ; PSNR and SSIM when those are skipped)."""
    sweep = sorted((r for r in rows if r["guidance"] is not None), key=lambda r: r["guidance"])
    if len(sweep) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = set(sweep[0]["metrics"])
    left, right = ("lpips", "musiq") if {"lpips", "musiq"} <= have else ("psnr", "ssim")
    xs = [r["guidance"] for r in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(xs, [r["metrics"][left] for r in sweep], "o-", color="tab:red", label=left.upper())
    ax.set_xlabel("guidance scale s")
    ax.set_ylabel(left.upper(), color="tab:red")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["metrics"][right] for r in sweep], "s--", color="tab:blue", label=right.upper())
    ax2.set_ylabel(right.upper(), color="tab:blue")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"{left}+{right}"


def log_to_mlflow(cfg, summary: dict[str, Any], out: Path) -> str | None:
    """One MLflow run per evaluation: parameters, per-row mean metrics, the report files. None when disabled."""
    if not cfg.run.mlflow.enabled:
        return None
    from jobkit.tracking import log_job_run

    params = {"dataset": summary["dataset"], "images": summary["data"]["images"],
              "lr_source": summary["data"]["lr_source"], "crop": cfg.eval.crop,
              "scale": cfg.inference.upscale, "color_fix": cfg.inference.color_fix,
              "tile_size": cfg.inference.tile_size, "seed": cfg.inference.seed,
              **{f"model_{k}": v for k, v in summary["models"].items()},
              **{"peer_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", p["name"]): f"{p['architecture']} sha256:{p['sha256'][:16]}"
                 for p in summary.get("peers", [])},
              **{f"metric_file_{k}": v["file"] for k, v in summary.get("metric_files", {}).items()}}
    metrics = {}
    for row in summary["rows"]:
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", row["label"]).strip("_")
        metrics.update({f"{key}/{m}": v for m, v in row["metrics"].items() if math.isfinite(v)})
    files = [(out / name, "eval") for name in ("summary.json", "table.md", "per_image.csv", "guidance_sweep.png")]
    return log_job_run(cfg, "eval", params, summary, metrics=metrics, artifacts=files)


def upload_folder(local: Path, uri: str, endpoint: str = "") -> list[str]:
    """Every file under `local` to the same relative name under `uri`, each written atomically (vosr.storage)."""
    from vosr import storage

    written = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        dst = storage.join(uri, *path.relative_to(local).parts)
        storage.write_bytes_atomic(dst, path.read_bytes(), endpoint)
        written.append(dst)
    return written


def run(cfg) -> dict[str, Any]:
    """Evaluate into eval.output; an s3:// output is written to a local temporary folder first, then uploaded file
    by file (atomically), and the summary names the s3:// URIs."""
    from vosr import storage

    if not storage.is_remote(cfg.eval.output):
        return _run(cfg, Path(cfg.eval.output), cfg.eval.output)
    endpoint = _endpoint(cfg)
    with tempfile.TemporaryDirectory(prefix="vosr-eval-") as tmp:
        summary = _run(cfg, Path(tmp), cfg.eval.output.rstrip("/"))
        summary["uploaded"] = len(upload_folder(Path(tmp), cfg.eval.output.rstrip("/"), endpoint))
    return summary


def _run(cfg, out: Path, final: str) -> dict[str, Any]:
    """The four stages, writing into the local folder `out`; paths in the summary are under `final` (`out` itself
    for a local output, the s3:// URI it is uploaded to otherwise)."""
    from vosr import storage

    t0 = time.perf_counter()
    ecfg = cfg.eval
    out.mkdir(parents=True, exist_ok=True)
    pairs, info = load_pairs(cfg)                                    # stage 1
    if not pairs:
        raise ValueError(f"no image pairs to evaluate in {info['hr_dir']} (skipped: {info['skipped']})")
    settings, sources = build_settings(cfg)                          # stage 2
    device = settings[1].upscaler.device.type if len(settings) > 1 else "cpu"
    iqa = IQAMetrics(list(ecfg.iqa_metrics), device=device, weights=list(ecfg.metric_weights))   # stage 3
    image_dir = out / "images" if ecfg.save_images else None
    rows = [evaluate_setting(s, pairs, cfg, iqa, image_dir) for s in settings]
    if storage.is_remote(info["hr_dir"]):
        parts = info["hr_dir"].rstrip("/").split("/")
    else:
        parts = list(Path(info["hr_dir"]).resolve().parts)
    dataset = ecfg.dataset_name or (parts[-2] if parts[-1] in ("HR", "test_HR") and len(parts) > 1 else parts[-1])
    table = markdown_table(rows, dataset, iqa.skipped, iqa.files, iqa.undefined)      # stage 4
    (out / "table.md").write_text(table)
    write_per_image_csv(rows, out / "per_image.csv")
    plot = sweep_plot(rows, out / "guidance_sweep.png",
                      f"{dataset}: effect of guidance scale (VOSR-ms, {len(pairs)} images)")
    summary = {
        "dataset": dataset, "data": info, "models": sources,
        "rows": [{k: v for k, v in r.items() if k != "per_image"} for r in rows],
        "metrics_skipped": iqa.skipped, "metrics_computed": sorted({"psnr", "ssim", *iqa.metrics}),
        "metric_files": iqa.files, "metrics_undefined": iqa.undefined,
        "peers": [r["peer"] for r in rows if r.get("peer")],
        "output": final, "table": storage.join(final, "table.md"),
        "per_image_csv": storage.join(final, "per_image.csv"),
        "plot": storage.join(final, "guidance_sweep.png") if plot else None,
        "plot_metrics": plot, "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "summary.json").write_text(json.dumps({**summary, "per_image": {r["label"]: r["per_image"]
                                                                              for r in rows}}, indent=2))
    summary["summary_json"] = storage.join(final, "summary.json")
    summary["mlflow_run_id"] = log_to_mlflow(cfg, summary, out)
    return summary


def main(argv: list[str] | None = None) -> int:
    from jobkit.args import job_main

    # a missing benchmark folder or an unusable peer file (PeerError is a ValueError) is the user's input
    return job_main(__doc__, argv, lambda cfg, _: run(cfg), writes=["eval.output"],
                    usage_errors=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    raise SystemExit(main())


# --- vosr plan -----------------------------------------------------------------------------------------------------

def plan_stages(cfg, images: int) -> list:
    """`vosr plan` entries of the evaluation (jobkit/plan.py): one process holding the models (student, teacher,
    encoders; fp32) and one image pair at a time at eval.crop (or a 4,096 px side when uncropped) through the
    metrics; its result lists grow by a few numbers per image, whatever the corpus (images of the benchmark
    folder, not of the training corpus)."""
    from jobkit.plan import Proc, Stage, gib
    from pipelines.features.stages import ENCODER_WEIGHT_BYTES
    from vosr.model import count_parameters

    counts = count_parameters(cfg)
    weights = 4 * (counts["student_params"] + counts["dit_params"]) \
        + ENCODER_WEIGHT_BYTES.get(cfg.autoencoder.name, 0) + ENCODER_WEIGHT_BYTES.get(cfg.semantic.name, 0)
    side = cfg.eval.crop or 4096
    work = 64 * side * side * 3 * 4  # the HR, LR, outputs and metric networks' activations in float32
    return [Stage("evaluate", [Proc("driver", weights + work + (2 << 30),
                                    f"weights {gib(weights)} + 64 float images of {side} px + 2 GiB", "head")],
                  note="one process; independent of the corpus")]
