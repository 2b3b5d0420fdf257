"""The demo's report: outputs/demo/report.md and report.html from what the chain's jobs wrote.

Sources, all produced by the jobs themselves: the stage summaries (summaries/<stage>.json, the JSON each job
printed), the evaluation outputs (eval_teacher/, eval_student/: results JSON, table, guidance plot, images), the
endpoint's answer (serve/), and the MLflow store (run ids). Nothing here computes a metric; it lays them out.

    python demo/report.py --out outputs/demo      # rebuild the report of an earlier chain
"""

from __future__ import annotations

import argparse
import html
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

STAGE_ORDER = ["curate", "precompute", "pretrain", "distill", "evaluate", "serve"]


# --- reading --------------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def stage_summaries(out: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for key in STAGE_ORDER:
        data = read_json(out / "summaries" / f"{key}.json")
        if data:
            found[key] = data
    return found


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{digits}f}"
    return str(v)


def stage_facts(key: str, s: dict[str, Any]) -> str:
    """One line of the most telling numbers of a stage's summary."""
    if not s:
        return ""
    if key == "curate":
        failed = ", ".join(f"{k} {v}" for k, v in sorted((s.get("failed") or {}).items()))
        filtered = ", ".join(f"{k} {v}" for k, v in sorted((s.get("filtered") or {}).items()))
        return (f"{s.get('seen', '?')} URLs seen, {s.get('fetched', '?')} fetched, failed: {failed or 'none'}; "
                f"filtered: {filtered or 'none'}; {s.get('duplicates', '?')} near/exact duplicates; "
                f"{s.get('kept', '?')} kept in {s.get('shards_written', '?')} shards")
    if key == "precompute":
        parts = []
        for name in ("images", "rows", "shards_written", "variants", "samples_per_s", "bytes_per_sample"):
            if name in s:
                parts.append(f"{name.replace('_', ' ')} {_fmt(s[name])}")
        return "; ".join(parts) or ", ".join(f"{k} {_fmt(v)}" for k, v in list(s.items())[:6]
                                             if not isinstance(v, (dict, list)))
    if key in ("pretrain", "distill"):
        losses = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in sorted((s.get("final_losses") or {}).items()))
        reg = (s.get("registered_model") or {}).get("uri")
        workers = s.get("num_workers", "?")
        return (f"{s.get('steps', '?')} steps x batch {s.get('global_batch', '?')} on {workers} "
                f"Ray Train worker{'' if workers == 1 else 's'}, {_fmt(s.get('samples_per_s', 0.0))} samples/s; "
                f"final {losses or 'loss n/a'}"
                + (f"; registered as `{reg}`" if reg else ""))
    if key == "evaluate":
        data = s.get("data") or {}
        peers = len(s.get("peers") or [])
        return (f"{data.get('images', '?')} held-out photos, {len(s.get('rows', []))} rows (bicubic, student, "
                f"teacher per guidance s{f', {peers} peer(s)' if peers else ''}); table `{s.get('table', '')}`")
    if key == "serve":
        return (f"POST {s.get('input_size')} px -> PNG {s.get('output_size')} px, HTTP {s.get('status')}, "
                f"{s.get('seconds')} s")
    return ""


def mlflow_runs(out: Path, since: float | None = None) -> list[dict[str, Any]]:
    """Runs of the demo's MLflow store (newest chain first), as (name, id, status, job)."""
    db = out / "mlflow.db"
    if not db.is_file():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    runs = []
    for exp in client.search_experiments():
        for r in client.search_runs([exp.experiment_id], max_results=200, order_by=["attributes.start_time ASC"]):
            if since is not None and r.info.start_time / 1000.0 < since - 1:
                continue
            runs.append({"experiment": exp.name, "name": r.info.run_name, "run_id": r.info.run_id,
                         "status": r.info.status, "start": r.info.start_time / 1000.0})
    runs.sort(key=lambda r: r["start"])
    return runs


# --- evaluation -----------------------------------------------------------------------------------------------

def _mirror(uri: str, dst: Path) -> Path:
    """A local copy of the files under a storage URI (s3://...), for the report's pictures and numbers."""
    from vosr import storage

    base = uri.rstrip("/")
    for f in storage.list_files(base):
        local = dst.joinpath(*f[len(base) + 1:].split("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(storage.read_bytes(f))
    return dst


def eval_folder(out: Path) -> Path:
    """The evaluation output as a local folder: <out>/eval, or, when the evaluate stage wrote to storage (the chain's
    --storage s3://...), a copy of it under report_assets/eval (its held-out photos under report_assets/holdout)."""
    ev_summary = (read_json(out / "summaries" / "evaluate.json").get("summary") or {})
    remote = ev_summary.get("output") or ""
    if (out / "eval" / "summary.json").is_file() or "://" not in remote:
        return out / "eval"
    folder = out / "report_assets" / "eval"
    shutil.rmtree(folder, ignore_errors=True)
    return _mirror(remote, folder)


def evaluation(out: Path, folder: Path | None = None) -> dict[str, Any]:
    """inference/evaluate.py's summary.json: rows (label, group, guidance, metrics{psnr, ssim}, seconds), data."""
    return read_json((folder or out / "eval") / "summary.json")


GROUP_KIND = {"Baseline": "bicubic", "Multi-step": "teacher", "One-step": "student", "Peer": "peer"}
# Paper Table 3 (RealSR): the RC-distilled one-step student keeps its teacher's quality (LPIPS 0.2856 vs the
# teacher's 0.3069); the demo reads this as a fidelity budget: student PSNR-Y at most 1 dB below the teacher's.
STUDENT_GAP_DB = 1.0


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def evaluation_rows(ev: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for r in ev.get("rows", []):
        group = r.get("group", "")
        kind = r.get("kind") or GROUP_KIND.get(group, group)
        m = r.get("metrics") or {}
        rows.append({"label": r.get("label", ""), "kind": kind, "guidance": r.get("guidance"),
                     "psnr_y": m.get("psnr"), "ssim_y": m.get("ssim"), "stlpips": m.get("stlpips"),
                     "niqe": m.get("niqe"), "seconds": r.get("seconds"), "options": r.get("options", {})})
    return rows


def fidelity_checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The two claims of the paper the tiny demo can test, with their numbers.

    1. guidance: PSNR-Y rises with the guidance scale s over the teacher's sweep (paper Fig. 4: a larger s moves
       the output from generative towards faithful to the LR; met when every step up in s raises PSNR-Y).
    2. student: the one-step student's PSNR-Y is at most STUDENT_GAP_DB below its teacher's at the configured s
       (the first teacher row; paper Table 3: distillation keeps the teacher's quality).
    """
    teacher = [r for r in rows if r["kind"] == "teacher" and _num(r["psnr_y"]) is not None
               and r["guidance"] is not None]
    sweep = sorted({float(r["guidance"]): r["psnr_y"] for r in teacher}.items())
    steps = [b[1] - a[1] for a, b in zip(sweep, sweep[1:])]
    guidance = {"points": sweep, "applicable": len(sweep) >= 2,
                "rise_db": sweep[-1][1] - sweep[0][1] if len(sweep) >= 2 else None,
                "met": len(sweep) >= 2 and all(d > 0 for d in steps)}
    student = next((r for r in rows if r["kind"] == "student" and _num(r["psnr_y"]) is not None), None)
    ref = teacher[0] if teacher else None
    gap = student["psnr_y"] - ref["psnr_y"] if student and ref else None
    distill = {"student": student, "teacher": ref, "gap_db": gap, "budget_db": STUDENT_GAP_DB,
               "applicable": gap is not None, "met": gap is not None and gap >= -STUDENT_GAP_DB}
    return {"guidance_rises": guidance, "student_within_teacher": distill}


def perception_distortion(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each row's place on the perception-distortion plane (PSNR-Y up, ST-LPIPS down): the rows no other row
    beats on both axes form the front. Without ST-LPIPS only the distortion axis is known."""
    pts = [r for r in rows if _num(r["psnr_y"]) is not None]
    have = [r for r in pts if _num(r.get("stlpips")) is not None]
    front = []
    if have:
        for r in have:
            if not any(o is not r and o["psnr_y"] >= r["psnr_y"] and o["stlpips"] <= r["stlpips"]
                       and (o["psnr_y"] > r["psnr_y"] or o["stlpips"] < r["stlpips"]) for o in have):
                front.append(r["label"])
    return {"perceptual_axis": "stlpips" if have else None, "front": front,
            "by_psnr": [r["label"] for r in sorted(pts, key=lambda r: -r["psnr_y"])]}


def pd_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    have = [r for r in rows if _num(r["psnr_y"]) is not None and _num(r.get("stlpips")) is not None]
    if len(have) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"bicubic": "tab:gray", "peer": "tab:green", "teacher": "tab:red", "student": "tab:blue"}
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for r in have:
        ax.scatter(r["psnr_y"], r["stlpips"], color=colours.get(r["kind"], "black"))
        ax.annotate(r["label"], (r["psnr_y"], r["stlpips"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("PSNR-Y (dB), distortion: higher is better")
    ax.set_ylabel("ST-LPIPS, perception: lower is better")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _slug(label: str) -> str:  # the folder name inference/evaluate.py gives a row's images
    import re

    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label).strip("_")


def _best_teacher(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    teacher = [r for r in rows if r["kind"] == "teacher" and _num(r["psnr_y"]) is not None]
    return max(teacher, key=lambda r: r["psnr_y"]) if teacher else None


def image_grid(out: Path, ev: dict[str, Any], rows: list[dict[str, Any]], holdout: list[str], cell: int = 192,
               folder: Path | None = None) -> Path | None:
    """Held-out photos side by side: bicubic | each peer | teacher (best s) | student | HR (the evaluated crop)."""
    from PIL import Image, ImageDraw

    image_root = (folder or out / "eval") / "images"
    if not image_root.is_dir():
        return None
    best_t = _best_teacher(rows)
    picks = [("bicubic", next((r for r in rows if r["kind"] == "bicubic"), None))]
    picks += [(f"peer {r['label']}", r) for r in rows if r["kind"] == "peer"]
    picks += [(f"teacher s={(best_t or {}).get('guidance')}", best_t),
              ("student (1 step)", next((r for r in rows if r["kind"] == "student"), None))]
    cols: list[tuple[str, Path | None]] = []
    for title, row in picks:
        if row is not None:
            cols.append((title, image_root / _slug(row["label"])))
    cols.append(("HR", None))
    crop = int((ev.get("data") or {}).get("crop") or 0)
    hr_uri = str((ev.get("data") or {}).get("hr_dir") or out / "holdout")
    hr_dir = _mirror(hr_uri, out / "report_assets" / "holdout") if "://" in hr_uri else Path(hr_uri)
    names = sorted(p.stem for p in (cols[0][1].iterdir() if cols[0][1] and cols[0][1].is_dir() else []))
    if not names:
        return None
    head = 22
    grid = Image.new("RGB", (cell * len(cols), head + cell * len(names)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (title, _) in enumerate(cols):
        draw.text((j * cell + 6, 5), title, fill="black")
    for i, name in enumerate(names):
        for j, (_, folder) in enumerate(cols):
            if folder is not None:
                path = folder / f"{name}.png"
                if not path.is_file():
                    continue
                img = Image.open(path).convert("RGB")
            else:
                src = next((p for p in hr_dir.iterdir() if p.stem == name), None) if hr_dir.is_dir() else None
                if src is None:
                    continue
                img = Image.open(src).convert("RGB")
                if crop:
                    w, h = img.size
                    img = img.crop(((w - crop) // 2, (h - crop) // 2, (w - crop) // 2 + crop, (h - crop) // 2 + crop))
            grid.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (j * cell, head + i * cell))
    path = out / "report_assets" / "grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# --- writing --------------------------------------------------------------------------------------------------

def _copy_asset(src: Path | None, out: Path, name: str) -> str | None:
    if src is None or not src.is_file():
        return None
    dst = out / "report_assets" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return dst.relative_to(out).as_posix()


def build(out: Path, site: dict[str, Any] | None = None, holdout: list[str] | None = None,
          total_s: float | None = None, teacher: str = "", student: str = "", since: float | None = None
          ) -> dict[str, Any]:
    """Everything the report shows, as data (the markdown and HTML writers only lay it out)."""
    summaries = stage_summaries(out)
    folder = eval_folder(out)
    ev = evaluation(out, folder)
    rows = evaluation_rows(ev)
    checks = fidelity_checks(rows)
    grid = image_grid(out, ev, rows, holdout or [], folder=folder)
    pd_png = pd_plot(rows, out / "report_assets" / "perception_distortion.png")
    plot = ev.get("plot")
    if plot and "://" in plot:            # on storage: its local copy
        plot = str(folder / "guidance_sweep.png")
    return {
        "out": out, "site": site or {}, "holdout": holdout or [], "total_s": total_s, "teacher": teacher,
        "student": student, "summaries": summaries, "rows": rows, "eval": ev, "checks": checks,
        "pd": perception_distortion(rows), "pd_plot": pd_png.relative_to(out).as_posix() if pd_png else None,
        "runs": mlflow_runs(out, since),
        "guidance_plot": _copy_asset(Path(plot), out, "guidance_sweep.png") if plot else None,
        "grid": grid.relative_to(out).as_posix() if grid else None,
        "serve_in": _copy_asset(out / "serve" / "request.png", out, "serve_request.png"),
        "serve_out": _copy_asset(out / "serve" / "answer.png", out, "serve_answer.png"),
        "machine": f"{platform.machine()}, {_cpu_count()} CPU cores, Python {platform.python_version()}",
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def to_markdown(d: dict[str, Any]) -> str:
    out: Path = d["out"]
    lines = ["# VOSR demo report", ""]
    total = d["total_s"]
    lines.append(f"The whole chain (crawl -> curate -> precompute -> pretrain -> distill -> evaluate -> serve) on the "
                 f"tiny preset{f', in {total / 60:.1f} min' if total else ''}; {d['machine']}; written {d['written']}.")
    lines.append("The tiny preset is the project's debug model: a pixel space-to-depth codec and a *randomly "
                 "initialised* tiny ViT as the semantic encoder, which carries no semantics. Numbers below show the "
                 "system working end to end, not the paper's quality.")
    lines.append("")
    if d["rows"]:
        lines += [*_checks_lines(d), ""]
    lines += ["## Stages", "", "| stage | wall time (s) | what it did |", "| --- | ---: | --- |"]
    for key, data in d["summaries"].items():
        lines.append(f"| {key} | {_fmt(data.get('seconds', 0.0), 1)} | {stage_facts(key, data.get('summary', {}))} |")
    lines.append("")
    site = d["site"]
    if site:
        exp = ", ".join(f"{k} {v}" for k, v in sorted(site.get("expected", {}).items()))
        lines.append(f"The crawl fetched the loopback photo site ({site.get('urls')} URLs: {exp}). "
                     f"Held out of training and crawl: {', '.join(d['holdout'])}.")
        lines.append("")
    lines += ["## Evaluation on the held-out photos", ""]
    if d["rows"]:
        lines += [_protocol(d), ""]
        lines += ["| method | kind | guidance s | steps | PSNR-Y (dB) | SSIM-Y | ST-LPIPS | NIQE | seconds |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in d["rows"]:
            steps = r["options"].get("steps", 1 if r["kind"] == "student" else "")
            g = "" if r["guidance"] is None else _fmt(float(r["guidance"]), 1)
            lines.append(f"| {r['label']} | {r['kind']} | {g} | {steps} | {_fmt(r['psnr_y'], 3)} | "
                         f"{_fmt(r['ssim_y'], 4)} | {_fmt(_num(r['stlpips']), 4) if _num(r['stlpips']) is not None else 'n/a'} | "
                         f"{_fmt(_num(r['niqe']), 3) if _num(r['niqe']) is not None else 'n/a'} | "
                         f"{_fmt(r['seconds'], 1)} |")
        lines.append("")
        files = d["eval"].get("metric_files") or {}
        for k, v in sorted(files.items()):
            lines.append(f"- {k} computed with `{v.get('file')}`" + (f" (sha256 {v['sha256'][:16]}...)"
                                                                  if v.get("sha256") else "") + f", {v.get('via')}")
        for p in d["eval"].get("peers") or []:
            lines.append(f"- peer {p['name']}: {p['architecture']} x{p['scale']} from `{p['path']}` "
                         f"(sha256 {p['sha256'][:16]}...), same crops and tiling as the VOSR rows")
        skipped = d["eval"].get("metrics_skipped") or {}
        if skipped:
            lines += [f"- not computed: {', '.join(sorted(skipped))} (no local file and no pyiqa weights; nothing is "
                      "downloaded; reasons in eval/table.md)"]
        lines += ["", *_pd_lines(d), ""]
    else:
        lines += ["No evaluation results were found (eval/summary.json).", ""]
    if d["guidance_plot"]:
        lines += ["### Guidance sweep (teacher, like the paper's Fig. 4)", "",
                  f"![guidance sweep]({d['guidance_plot']})", ""]
    if d["grid"]:
        lines += ["### Side by side (bicubic | peers | teacher at its best s | student | HR)", "",
                  f"![side by side]({d['grid']})", ""]
    if d["serve_out"]:
        s = d["summaries"].get("serve", {}).get("summary", {})
        lines += ["## The endpoint", "",
                  f"Ray Serve started with the registered student (`{d['student']}`), answered one request "
                  f"({s.get('input_size')} -> {s.get('output_size')} px) and stopped.", "",
                  "| request | answer |", "| --- | --- |",
                  f"| ![request]({d['serve_in']}) | ![answer]({d['serve_out']}) |", ""]
    lines += ["## MLflow", ""]
    if d["runs"]:
        lines += ["| run | run id | status |", "| --- | --- | --- |"]
        lines += [f"| {r['name']} | `{r['run_id']}` | {r['status']} |" for r in d["runs"]]
        lines.append("")
    db = (out / "mlflow.db").resolve()
    lines += ["Open the MLflow UI on this store:", "",
              f"    .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --port 5000", "",
              "then browse http://127.0.0.1:5000 (experiment `vosr-demo`; the student is under Models).", ""]
    lines += ["## Files", "", f"- teacher checkpoint: `{d['teacher']}`", f"- student: `{d['student']}`",
              f"- stage logs: `{(out / 'logs').as_posix()}`; stage summaries: `{(out / 'summaries').as_posix()}`", ""]
    return "\n".join(lines)


TINY_SCOPE = ("What the tiny preset can show: the whole system working end to end, and the direction of two effects "
              "the paper reports that do not need a strong model: PSNR-Y rising with the guidance scale s, and a "
              "one-step student that keeps its teacher's fidelity. What it cannot show: the paper's quality or its "
              "Table 1 numbers. Its semantic encoder is a randomly initialised tiny ViT (no semantics), its codec a "
              "pixel space-to-depth, and it trains for minutes on a few dozen photos; a sampled output also pays "
              "the posterior's spread in PSNR, so generative rows sit below bicubic on PSNR-Y as expected (the "
              "paper's VOSR-0.5B-os scores 25.42 dB PSNR on RealSR, where bicubic scores about 27 dB). Being above or "
              "below bicubic on PSNR-Y is therefore not a property of the method and not a bar here.")


def _checks_lines(d: dict[str, Any]) -> list[str]:
    c = d["checks"]
    g, s = c["guidance_rises"], c["student_within_teacher"]
    lines = ["**Fidelity checks** (the paper's claims the tiny demo can test, on the held-out photos):", ""]
    if g["applicable"]:
        pts = ", ".join(f"s={k:g}: {v:.3f} dB" for k, v in g["points"])
        lines.append(f"- PSNR-Y rises with the guidance scale s (paper Fig. 4: a larger s moves the teacher from "
                     f"generative towards faithful to the LR): **{'met' if g['met'] else 'NOT met'}** ({pts}; "
                     f"{g['rise_db']:+.3f} dB from the smallest to the largest s).")
    else:
        lines.append("- PSNR-Y rises with the guidance scale s: not checked (fewer than two teacher rows).")
    if s["applicable"]:
        lines.append(f"- the one-step student stays within {s['budget_db']:g} dB of its teacher on PSNR-Y (paper "
                     f"Table 3: distillation keeps the teacher's quality): **{'met' if s['met'] else 'NOT met'}** "
                     f"(student {s['student']['psnr_y']:.3f} dB vs {s['teacher']['label']} "
                     f"{s['teacher']['psnr_y']:.3f} dB: {s['gap_db']:+.3f} dB).")
    else:
        lines.append("- the one-step student within 1 dB of its teacher: not checked (needs a student and a teacher "
                     "row).")
    lines += ["", TINY_SCOPE]
    return lines


def _pd_lines(d: dict[str, Any]) -> list[str]:
    pd = d["pd"]
    rows = {r["label"]: r for r in d["rows"]}
    order = ", ".join(f"{lab} ({rows[lab]['kind']}, {rows[lab]['psnr_y']:.2f} dB)" for lab in pd["by_psnr"])
    lines = [f"**Perception-distortion position.** By PSNR-Y (distortion), best first: {order}."]
    if pd["perceptual_axis"]:
        lines.append(f"With ST-LPIPS as the perception axis, the rows no other row beats on both axes (the "
                     f"perception-distortion front) are: {', '.join(pd['front'])}; a generative row off the front "
                     "is beaten on both axes by the row that dominates it.")
        if d.get("pd_plot"):
            lines += ["", f"![perception-distortion plane]({d['pd_plot']})"]
    else:
        lines.append("No perceptual metric ran (point eval.metric_weights at an ST-LPIPS file, see "
                     "`vosr config --explain eval`), so only the distortion axis is known: a generative row below "
                     "bicubic on PSNR-Y is not by itself a defect (see the tiny-preset note above).")
    return lines


def _protocol(d: dict[str, Any]) -> str:
    data = d["eval"].get("data") or {}
    crop = data.get("crop")
    scale = data.get("scale", 4)
    return (f"{data.get('images', '?')} held-out photos ({', '.join(d['holdout']) or data.get('hr_dir')}), never "
            f"crawled nor trained on. Protocol (the paper's synthetic LSDIR protocol, scaled to the tiny preset): "
            f"{crop} px HR centre crops, LR = {data.get('lr_source', '?')} x{scale} of the HR with a fixed seed per "
            f"image ({crop // scale if crop else '?'} px), PSNR/SSIM on Y (BT.601) with a {scale} px border crop.")


def to_html(d: dict[str, Any], md: str) -> str:
    """A self-contained page: the markdown's structure rendered by a tiny converter (tables, images, code)."""
    body = []
    in_table = False
    in_code = False
    for line in md.splitlines():
        if line.startswith("    ") and not in_table:
            if not in_code:
                body.append("<pre><code>")
                in_code = True
            body.append(html.escape(line[4:]))
            continue
        if in_code:
            body.append("</code></pre>")
            in_code = False
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(set(c) <= set("-: ") for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                body.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells) + "</tr>")
                in_table = True
                continue
            body.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    if in_code:
        body.append("</code></pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%;image-rendering:pixelated}"
             "code{background:#f5f5f5;padding:1px 4px}pre{background:#f5f5f5;padding:8px;overflow-x:auto}")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>VOSR demo report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Markdown inline subset: images, `code`, **bold**."""
    import re

    parts = re.split(r"(!\[[^\]]*\]\([^)]+\)|`[^`]+`|\*\*[^*]+\*\*)", text)
    out = []
    for p in parts:
        m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", p)
        if m:
            out.append(f"<img alt='{html.escape(m.group(1))}' src='{html.escape(m.group(2))}'>")
        elif p.startswith("`") and p.endswith("`") and len(p) > 1:
            out.append(f"<code>{html.escape(p[1:-1])}</code>")
        elif p.startswith("**") and p.endswith("**") and len(p) > 3:
            out.append(f"<b>{html.escape(p[2:-2])}</b>")
        else:
            out.append(html.escape(p))
    return "".join(out)


def write_report(out: Path, site: dict[str, Any] | None = None,
                 holdout: list[str] | None = None, total_s: float | None = None, teacher: str = "",
                 student: str = "", since: float | None = None) -> dict[str, Path]:
    d = build(Path(out), site, holdout, total_s, teacher, student, since)
    md = to_markdown(d)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(d, md))
    (out / "report.json").write_text(json.dumps({"fidelity_checks": d["checks"], "perception_distortion": d["pd"],
                                                 "rows": d["rows"], "runs": d["runs"], "total_s": total_s},
                                                indent=2, default=str))
    return {"md": out / "report.md", "html": out / "report.html"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rebuild the demo report from an earlier chain's outputs.")
    p.add_argument("--out", default="outputs/demo")
    args = p.parse_args(argv)
    out = Path(args.out)
    site = read_json(out / "summaries" / "site.json")
    paths = write_report(out, site)
    print(f"wrote {paths['md']} and {paths['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
