"""The demo's report: outputs/demo/report.md and report.html from what the chain's jobs wrote.

Sources, all produced by the jobs themselves: the stage summaries (summaries/<stage>.json, the JSON each job
printed), the evaluation outputs (eval_teacher/, eval_student/: results JSON, table, guidance plot, images), the
endpoint's answer (serve/), and the MLflow store (run ids). Nothing here computes a metric; it lays them out.
build() gathers the data, view() words it once; report.md is that text in markdown, report.html the same text
through the Jinja2 template templates/report.html.j2 (autoescaped, self-contained).

    python demo/report.py --out outputs/demo      # rebuild the report of an earlier chain
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from jobkit.jobs import chain

STAGE_ORDER = [job.name for job in chain()]  # the main chain of the job table (jobkit/jobs.py)


# The report's text: plain strings and marked spans, laid out as markdown (to_markdown) or HTML (to_html).

class Code(str):
    """A span shown as code: `x` in the markdown, <code> in the page."""


class Strong(str):
    """A span shown in bold."""


class Em(str):
    """A span shown in italics."""


@dataclass(frozen=True)
class Picture:
    alt: str
    src: str  # relative to the report's folder


Text = str | Picture | list  # one span, or a list of spans


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[Text]]
    num: tuple[int, ...] = ()  # right-aligned (numeric) columns


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


def stage_facts(key: str, s: dict[str, Any]) -> Text:
    """One line of the most telling numbers of a stage's summary (plain text, or spans with Code)."""
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
        return [f"{s.get('steps', '?')} steps x batch {s.get('global_batch', '?')} on {workers} "
                f"Ray Train worker{'' if workers == 1 else 's'}, {_fmt(s.get('samples_per_s', 0.0))} samples/s; "
                f"final {losses or 'loss n/a'}", *(["; registered as ", Code(reg)] if reg else [])]
    if key == "evaluate":
        data = s.get("data") or {}
        peers = len(s.get("peers") or [])
        return [f"{data.get('images', '?')} held-out photos, {len(s.get('rows', []))} rows (bicubic, student, "
                f"teacher per guidance s{f', {peers} peer(s)' if peers else ''}); table ", Code(s.get("table", ""))]
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


# --- laying out -----------------------------------------------------------------------------------------------
# The report's text is built once, by view(), from spans and tables (above); to_markdown lays it out in markdown,
# to_html renders templates/report.html.j2 with it.

MD_MARKS = {Code: "`{}`", Strong: "**{}**", Em: "*{}*"}
TEMPLATES = Path(__file__).resolve().parent / "templates"  # shipped with the demo package (pyproject package-data)


def view(d: dict[str, Any]) -> dict[str, Any]:
    """What the report says, from build()'s data, before either markup."""
    out: Path = d["out"]
    total, site, runs = d["total_s"], d["site"], d["runs"]
    serve = d["summaries"].get("serve", {}).get("summary", {})
    figures = [("Guidance sweep (teacher, like the paper's Fig. 4)", Picture("guidance sweep", d["guidance_plot"])),
               ("Side by side (bicubic | peers | teacher at its best s | student | HR)",
                Picture("side by side", d["grid"]))]
    return {
        "intro": [f"The whole chain (crawl -> curate -> precompute -> pretrain -> distill -> evaluate -> serve) on the "
                  f"tiny preset{f', in {total / 60:.1f} min' if total else ''}; {d['machine']}; written {d['written']}.",
                  ["The tiny preset is the project's debug model: a pixel space-to-depth codec and a ",
                   Em("randomly initialised"), " tiny ViT as the semantic encoder, which carries no semantics. Numbers "
                   "below show the system working end to end, not the paper's quality."]],
        "checks": _checks(d) if d["rows"] else None,
        "stages": Table(["stage", "wall time (s)", "what it did"],
                        [[key, _fmt(data.get("seconds", 0.0), 1), stage_facts(key, data.get("summary", {}))]
                         for key, data in d["summaries"].items()], num=(1,)),
        "site": (f"The crawl fetched the loopback photo site ({site.get('urls')} URLs: "
                 f"{', '.join(f'{k} {v}' for k, v in sorted(site.get('expected', {}).items()))}). "
                 f"Held out of training and crawl: {', '.join(d['holdout'])}.") if site else None,
        "evaluation": _evaluation(d) if d["rows"] else None,
        "figures": [(title, pic) for title, pic in figures if pic.src],
        "serve": {"text": ["Ray Serve started with the registered student (", Code(d["student"]), "), answered one "
                           f"request ({serve.get('input_size')} -> {serve.get('output_size')} px) and stopped."],
                  "table": Table(["request", "answer"], [[Picture("request", str(d["serve_in"])),
                                                          Picture("answer", d["serve_out"])]])}
        if d["serve_out"] else None,
        "runs": Table(["run", "run id", "status"], [[str(r["name"]), Code(r["run_id"]), str(r["status"])]
                                                    for r in runs]) if runs else None,
        "mlflow_ui": f".venv/bin/mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()} --port 5000",
        "files": [["teacher checkpoint: ", Code(d["teacher"])], ["student: ", Code(d["student"])],
                  ["stage logs: ", Code((out / "logs").as_posix()), "; stage summaries: ",
                   Code((out / "summaries").as_posix())]],
    }


TINY_SCOPE = ("What the tiny preset can show: the whole system working end to end, and the direction of two effects "
              "the paper reports that do not need a strong model: PSNR-Y rising with the guidance scale s, and a "
              "one-step student that keeps its teacher's fidelity. What it cannot show: the paper's quality or its "
              "Table 1 numbers. Its semantic encoder is a randomly initialised tiny ViT (no semantics), its codec a "
              "pixel space-to-depth, and it trains for minutes on a few dozen photos; a sampled output also pays "
              "the posterior's spread in PSNR, so generative rows sit below bicubic on PSNR-Y as expected (the "
              "paper's VOSR-0.5B-os scores 25.42 dB PSNR on RealSR, where bicubic scores about 27 dB). Being above or "
              "below bicubic on PSNR-Y is therefore not a property of the method and not a bar here.")


def _checks(d: dict[str, Any]) -> dict[str, Any]:
    c = d["checks"]
    g, s = c["guidance_rises"], c["student_within_teacher"]
    items: list[Text] = []
    if g["applicable"]:
        pts = ", ".join(f"s={k:g}: {v:.3f} dB" for k, v in g["points"])
        items.append(["PSNR-Y rises with the guidance scale s (paper Fig. 4: a larger s moves the teacher from "
                      "generative towards faithful to the LR): ", Strong("met" if g["met"] else "NOT met"),
                      f" ({pts}; {g['rise_db']:+.3f} dB from the smallest to the largest s)."])
    else:
        items.append("PSNR-Y rises with the guidance scale s: not checked (fewer than two teacher rows).")
    if s["applicable"]:
        items.append([f"the one-step student stays within {s['budget_db']:g} dB of its teacher on PSNR-Y (paper "
                      "Table 3: distillation keeps the teacher's quality): ", Strong("met" if s["met"] else "NOT met"),
                      f" (student {s['student']['psnr_y']:.3f} dB vs {s['teacher']['label']} "
                      f"{s['teacher']['psnr_y']:.3f} dB: {s['gap_db']:+.3f} dB)."])
    else:
        items.append("the one-step student within 1 dB of its teacher: not checked (needs a student and a teacher "
                     "row).")
    return {"head": [Strong("Fidelity checks"), " (the paper's claims the tiny demo can test, on the held-out "
                                                "photos):"], "items": items, "scope": TINY_SCOPE}


def _evaluation(d: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for r in d["rows"]:
        steps = r["options"].get("steps", 1 if r["kind"] == "student" else "")
        rows.append([r["label"], r["kind"], "" if r["guidance"] is None else _fmt(float(r["guidance"]), 1), str(steps),
                     _fmt(r["psnr_y"], 3), _fmt(r["ssim_y"], 4),
                     _fmt(_num(r["stlpips"]), 4) if _num(r["stlpips"]) is not None else "n/a",
                     _fmt(_num(r["niqe"]), 3) if _num(r["niqe"]) is not None else "n/a", _fmt(r["seconds"], 1)])
    head = ["method", "kind", "guidance s", "steps", "PSNR-Y (dB)", "SSIM-Y", "ST-LPIPS", "NIQE", "seconds"]
    notes: list[Text] = []
    for k, v in sorted((d["eval"].get("metric_files") or {}).items()):
        notes.append([f"{k} computed with ", Code(f"{v.get('file')}"),
                      (f" (sha256 {v['sha256'][:16]}...)" if v.get("sha256") else "") + f", {v.get('via')}"])
    for p in d["eval"].get("peers") or []:
        notes.append([f"peer {p['name']}: {p['architecture']} x{p['scale']} from ", Code(p["path"]),
                      f" (sha256 {p['sha256'][:16]}...), same crops and tiling as the VOSR rows"])
    skipped = d["eval"].get("metrics_skipped") or {}
    if skipped:
        notes.append(f"not computed: {', '.join(sorted(skipped))} (no local file and no pyiqa weights; nothing is "
                     "downloaded; reasons in eval/table.md)")
    return {"protocol": _protocol(d), "table": Table(head, rows, num=tuple(range(2, 9))), "notes": notes, **_pd(d)}


def _pd(d: dict[str, Any]) -> dict[str, Any]:
    pd = d["pd"]
    rows = {r["label"]: r for r in d["rows"]}
    order = ", ".join(f"{lab} ({rows[lab]['kind']}, {rows[lab]['psnr_y']:.2f} dB)" for lab in pd["by_psnr"])
    text: list[Text] = [[Strong("Perception-distortion position."), f" By PSNR-Y (distortion), best first: {order}."]]
    if not pd["perceptual_axis"]:
        text.append(["No perceptual metric ran (point eval.metric_weights at an ST-LPIPS file, see ",
                     Code("vosr config --explain eval"), "), so only the distortion axis is known: a generative row "
                     "below bicubic on PSNR-Y is not by itself a defect (see the tiny-preset note above)."])
        return {"pd": text, "pd_plot": None}
    text.append(f"With ST-LPIPS as the perception axis, the rows no other row beats on both axes (the "
                f"perception-distortion front) are: {', '.join(pd['front'])}; a generative row off the front "
                "is beaten on both axes by the row that dominates it.")
    return {"pd": text, "pd_plot": Picture("perception-distortion plane", d["pd_plot"]) if d.get("pd_plot") else None}


def _protocol(d: dict[str, Any]) -> str:
    data = d["eval"].get("data") or {}
    crop = data.get("crop")
    scale = data.get("scale", 4)
    return (f"{data.get('images', '?')} held-out photos ({', '.join(d['holdout']) or data.get('hr_dir')}), never "
            f"crawled nor trained on. Protocol (the paper's synthetic LSDIR protocol, scaled to the tiny preset): "
            f"{crop} px HR centre crops, LR = {data.get('lr_source', '?')} x{scale} of the HR with a fixed seed per "
            f"image ({crop // scale if crop else '?'} px), PSNR/SSIM on Y (BT.601) with a {scale} px border crop.")


def _md(text: Text) -> str:
    spans = text if isinstance(text, list) else [text]
    return "".join(f"![{p.alt}]({p.src})" if isinstance(p, Picture) else MD_MARKS.get(type(p), "{}").format(p)
                   for p in spans)


def _md_table(t: Table) -> list[str]:
    rule = ["---:" if i in t.num else "---" for i in range(len(t.head))]
    return [f"| {' | '.join(cells)} |" for cells in (t.head, rule, *([_md(c) for c in r] for r in t.rows))]


def to_markdown(d: dict[str, Any]) -> str:
    v = view(d)
    lines = ["# VOSR demo report", "", *map(_md, v["intro"]), ""]
    if v["checks"]:
        c = v["checks"]
        lines += [_md(c["head"]), "", *(f"- {_md(i)}" for i in c["items"]), "", c["scope"], ""]
    lines += ["## Stages", "", *_md_table(v["stages"]), ""]
    if v["site"]:
        lines += [v["site"], ""]
    lines += ["## Evaluation on the held-out photos", ""]
    e = v["evaluation"]
    if e:
        lines += [e["protocol"], "", *_md_table(e["table"]), "", *(f"- {_md(n)}" for n in e["notes"]), "",
                  *map(_md, e["pd"]), *(["", _md(e["pd_plot"])] if e["pd_plot"] else []), ""]
    else:
        lines += ["No evaluation results were found (eval/summary.json).", ""]
    for title, pic in v["figures"]:
        lines += [f"### {title}", "", _md(pic), ""]
    if v["serve"]:
        lines += ["## The endpoint", "", _md(v["serve"]["text"]), "", *_md_table(v["serve"]["table"]), ""]
    lines += ["## MLflow", "", *([*_md_table(v["runs"]), ""] if v["runs"] else [])]
    lines += ["Open the MLflow UI on this store:", "", f"    {v['mlflow_ui']}", "",
              "then browse http://127.0.0.1:5000 (experiment `vosr-demo`; the student is under Models).", ""]
    lines += ["## Files", "", *(f"- {_md(f)}" for f in v["files"]), ""]
    return "\n".join(lines)


def to_html(d: dict[str, Any]) -> str:
    """A self-contained page (inline CSS, pictures by relative path): templates/report.html.j2 over view(d)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.tests.update(code=lambda p: isinstance(p, Code), strong=lambda p: isinstance(p, Strong),
                     em=lambda p: isinstance(p, Em), picture=lambda p: isinstance(p, Picture))
    return env.get_template("report.html.j2").render(view(d))


def write_report(out: Path, site: dict[str, Any] | None = None,
                 holdout: list[str] | None = None, total_s: float | None = None, teacher: str = "",
                 student: str = "", since: float | None = None) -> dict[str, Path]:
    d = build(Path(out), site, holdout, total_s, teacher, student, since)
    md = to_markdown(d)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(d))
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
