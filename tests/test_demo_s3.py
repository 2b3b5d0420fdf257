"""The whole demo chain (crawl -> curate -> precompute -> pretrain -> distill -> evaluate -> serve) with every
stage's data on s3:// against a real moto S3 server on loopback: the URL list, curated and feature shards, Ray Train
checkpoints, the MLflow artifacts (the registered student is downloaded from there to serve), the held-out photos
and the evaluation output (the s3:// teacher folder goes to the evaluation as it is). Tiny everything: 8 photos, one
variant, a one-block DiT, a few steps. Local: logs, stage summaries, the serve smoke test's images and the report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers.s3_fixture import s3_server

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.resolution=32", "semantic.input_size=32", "model.hidden_size=32", "model.depth=1",
        "model.num_heads=2", "model.patch_size=1", "precompute.variants=1", "train.steps=4", "train.batch_size=4",
        "train.checkpoint_every=2", "train.log_every=1", "eval.max_images=2", "eval.crop=64",
        "eval.sweep_steps=2", "eval.guidance_sweep=[0.0, 1.0]"]


CLEANER_WARNING = "Failed to query Ray Train Controller actor state"
PROGRESS = re.compile(r"\[(pretrain|distill)\] step (\d+)/(\d+) \(([\d.]+)%\) \| loss ([\d.]+) \| ([\d.]+) samples/s "
                      r"\| ETA (\d+:\d\d:\d\d) \| last checkpoint: (step \d+|none yet)")


def check_progress_logs(logs: Path) -> None:
    """Progress a person can follow, on the stage logs of a chain whose jobs join a dashboard-less local Ray (RAY_ADDRESS +
    VOSR_RAY_DASHBOARDLESS=1): one progress line per train.log_every (1) of the 4 steps, with the last checkpoint
    (checkpoint_every 2) and an ETA reaching 0; none of the placement-group cleaner's once-a-second warnings."""
    for job in ("pretrain", "distill"):
        text = (logs / f"{job}.log").read_text()
        found = [m.groups() for m in PROGRESS.finditer(text) if m.group(1) == job]
        assert [int(g[1]) for g in found] == [1, 2, 3, 4] and all(g[2] == "4" for g in found), text[-3000:]
        assert [g[7] for g in found] == ["none yet", "step 2", "step 2", "step 4"], found
        assert found[-1][6] == "0:00:00" and float(found[0][5]) > 0
    for log in logs.glob("*.log"):
        assert CLEANER_WARNING not in log.read_text(), log.name


def test_demo_chain_with_every_stage_on_s3(tmp_path):
    out = tmp_path / "demo"
    with s3_server() as s3:
        env = dict(os.environ)
        env.update({"AWS_ENDPOINT_URL": s3.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
                    "RAY_USAGE_STATS_ENABLED": "0", "VOSR_MODEL_CACHE": str(tmp_path / "model-cache")})
        cmd = [sys.executable, "-m", "demo", "--out", str(out), "--storage", s3.uri("demo"),
               "--max-photos", "8"]
        for s in TINY:
            cmd += ["--set", s]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        keys = s3.keys("demo/")
        ev = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="demo/eval/summary.json")["Body"].read())

    # every stage's data went to S3 ...
    def under(prefix: str, suffix: str = "") -> list[str]:
        return [k for k in keys if k.startswith(f"demo/{prefix}") and k.endswith(suffix)]

    assert under("urls.txt")
    assert under("curated/shards/", ".parquet") and under("curated/summary.json")
    assert under("features/shards/", ".parquet") and under("features/_vosr_features.json")
    assert under("checkpoints/demo-teacher/checkpoint_", "model.safetensors")
    assert under("checkpoints/demo-student/checkpoint_", "model.safetensors")
    assert under("mlartifacts/"), "MLflow artifacts (the registered student) are not on S3"
    assert len(under("holdout/")) == 6
    assert under("eval/summary.json") and under("eval/table.md") and under("eval/guidance_sweep.png")
    # ... and none of it locally
    for name in ("curated", "features", "checkpoints", "mlartifacts", "holdout", "eval", "teacher_checkpoint"):
        assert not (out / name).exists(), f"{name} was written locally"

    check_progress_logs(out / "logs")
    summaries = {p.stem: json.loads(p.read_text()) for p in (out / "summaries").glob("*.json")}
    curate = summaries["curate"]["summary"]
    assert curate["kept"] == 8 and curate["seen"] == 15 and curate["duplicates"] == 4
    assert summaries["pretrain"]["summary"]["steps"] == 4
    assert summaries["pretrain"]["summary"]["checkpoint_uri"].startswith("s3://")
    student = summaries["distill"]["summary"]["registered_model"]["uri"]
    assert student.startswith("models:/vosr-demo-student/")
    assert summaries["evaluate"]["summary"]["summary_json"] == s3.uri("demo/eval/summary.json")
    assert ev["table"] == s3.uri("demo/eval/table.md") and ev["data"]["hr_dir"] == s3.uri("demo/holdout")
    assert ev["models"]["teacher"] == summaries["pretrain"]["summary"]["checkpoint_uri"]
    cached = [json.loads(p.read_text())["uri"] for p in (tmp_path / "model-cache").glob("*/SOURCE.json")]
    assert cached == [ev["models"]["teacher"]]          # the s3:// teacher went through the model cache
    kinds = {r["group"] for r in ev["rows"]}
    assert kinds == {"Baseline", "Multi-step", "One-step"} and ev["data"]["images"] == 2
    assert all(r["metrics"]["psnr"] > 5 for r in ev["rows"])
    with Image.open(out / "serve" / "request.png") as a, Image.open(out / "serve" / "answer.png") as b:
        assert b.size == (4 * a.size[0], 4 * a.size[1])
    report = (out / "report.md").read_text()
    assert "## Evaluation on the held-out photos" in report and "mlflow ui --backend-store-uri" in report
    bicubic = next(r for r in ev["rows"] if r["group"] == "Baseline")["metrics"]["psnr"]
    assert f"{bicubic:.3f}" in report                        # the report's table comes from the JSON on S3
    assert (out / "report_assets" / "guidance_sweep.png").is_file()
    assert (out / "report.html").read_text().startswith("<!doctype html>")
