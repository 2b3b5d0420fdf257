"""The main job on the embedded default: crawl -> curate -> precompute -> pretrain -> distill -> evaluate -> serve.

Every stage is the job a user submits to a cluster (`ray job submit -- python <script> --config <file>`), run here
as `python -m <module> --config configs/demo/<stage>.yaml` from the repository root. All stages share one local Ray
(started here once; each job joins it through RAY_ADDRESS, as under `ray job submit`) and one MLflow store
(sqlite under the demo's output root). Only what a stage learns from the one before is passed with `--set`
(the teacher checkpoint, the registered student version); everything else is in the config files.

    python -m demo                             # the whole chain (make demo; also `vosr demo`)
    python -m demo --from pretrain             # re-run from a stage, reusing the earlier stages' outputs
    python -m demo --out /tmp/demo --set train.steps=50   # extra --set goes to every stage

Outputs under --out (default outputs/demo): urls.txt, curated/, features/, checkpoints/, eval*/, serve/,
logs/<stage>.log, summaries/<stage>.json, mlflow.db + mlartifacts/, report.md and report.html.

It runs from a checkout of the repository (the stage configs in configs/demo/ and the photos in assets/photos/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobkit import jobs

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT_LIST = ROOT / "demo" / "holdout.txt"
PHOTO_DIR = ROOT / "assets" / "photos"
STAGES = [job.name for job in jobs.chain()]  # the main chain of the job table (jobkit/jobs.py)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_holdout(path: Path = HOLDOUT_LIST) -> list[str]:
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    missing = [n for n in names if not (PHOTO_DIR / n).is_file()]
    if missing:
        raise SystemExit(f"{path}: held-out photos not in {PHOTO_DIR}: {missing}")
    return names


def last_json_object(text: str) -> dict[str, Any] | None:
    """The summary JSON a job prints at the end: the last parseable `{...}` that starts a line."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if not lines[i].startswith("{"):
            continue
        for j in range(len(lines), i, -1):
            try:
                obj = json.loads("\n".join(lines[i:j]))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


@dataclass
class StageResult:
    name: str
    command: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    log: str = ""
    skipped: bool = False


class Chain:
    def __init__(self, out: Path, extra_sets: list[str], ray_address: str, env: dict[str, str],
                 storage_root: str = ""):
        self.out = out
        self.storage_root = storage_root
        self.extra_sets = extra_sets
        self.ray_address = ray_address
        self.env = env
        self.results: dict[str, StageResult] = {}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "summaries").mkdir(parents=True, exist_ok=True)

    # -- running one job ------------------------------------------------------------------------------------
    def command(self, stage: str, sets: list[str] | None = None, config: str | None = None,
                extra_args: list[str] | None = None) -> list[str]:
        cfg = config or jobs.JOBS[stage].demo_config
        cmd = [sys.executable, "-m", jobs.JOBS[stage].module, "--config", cfg, *(extra_args or [])]
        for s in [*self.base_sets(), *(sets or []), *self.extra_sets]:
            cmd += ["--set", s]
        return cmd

    def data_uri(self, name: str) -> str:
        """Where a stage's data lives: under --storage (e.g. s3://bucket/demo) when given, else under --out."""
        return f"{self.storage_root.rstrip('/')}/{name}" if self.storage_root else str(self.out / name)

    def base_sets(self) -> list[str]:
        """Only when the output root or the storage is not the configs' default: move every path there."""
        default = self.out.resolve() == (ROOT / "outputs" / "demo").resolve() and not self.storage_root
        if default:
            return []
        o = str(self.out)
        sets = [f"run.output_root={o}", f"curate.sources=[{self.data_uri('urls.txt')}]",
                f"curate.output={self.data_uri('curated')}", f"precompute.input={self.data_uri('curated')}",
                f"precompute.output={self.data_uri('features')}", f"train.features={self.data_uri('features')}",
                f"train.storage_path={self.data_uri('checkpoints')}", f"eval.hr_dir={self.data_uri('holdout')}",
                f"eval.output={self.data_uri('eval')}"]
        if self.storage_root:
            sets.append(f"run.mlflow.artifact_location={self.data_uri('mlartifacts')}")
        return sets

    def run(self, stage: str, sets: list[str] | None = None, key: str | None = None,
            config: str | None = None, extra_args: list[str] | None = None) -> StageResult:
        key = key or stage
        cmd = self.command(stage, sets, config, extra_args)
        res = StageResult(key, cmd)
        log(f"stage {key}: python {' '.join(cmd[1:])}")
        t0 = time.time()
        logfile = self.out / "logs" / f"{key}.log"
        with open(logfile, "w") as fh:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1)
            chunks: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                chunks.append(line)
                print(f"  [{key}] {line}", end="", flush=True)
            res.returncode = proc.wait()
        res.seconds = time.time() - t0
        res.log = str(logfile)
        res.summary = last_json_object("".join(chunks)) or {}
        (self.out / "summaries" / f"{key}.json").write_text(json.dumps(
            {"stage": key, "command": cmd[1:], "seconds": res.seconds, "returncode": res.returncode,
             "summary": res.summary}, indent=2, default=str))
        self.results[key] = res
        if res.returncode != 0:
            raise SystemExit(f"stage {key} failed with exit status {res.returncode}; its log: {logfile}")
        log(f"stage {key} done in {res.seconds:.0f}s")
        return res

    def load_previous(self, key: str) -> StageResult:
        path = self.out / "summaries" / f"{key}.json"
        if not path.is_file():
            raise SystemExit(f"--from needs the earlier stage {key}'s summary at {path}; run the whole chain first")
        data = json.loads(path.read_text())
        res = StageResult(key, data["command"], data["seconds"], data["returncode"], data["summary"],
                          str(self.out / "logs" / f"{key}.log"), skipped=True)
        self.results[key] = res
        return res


def start_local_ray(num_cpus: int, object_store_mb: int) -> str:
    """One Ray for the whole chain; the jobs join it like `ray job submit` jobs join a cluster."""
    import ray

    from jobkit.ray_env import start_local_ray as start

    # address="local": always a new Ray of our own, never another Ray that happens to run on this machine. Its
    # training jobs (started after this, with this environment) give their workers the quiet hook (jobkit/ray_env.py).
    start(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20,
          log_to_driver=False)
    return ray.get_runtime_context().gcs_address


def prepare_holdout(out: Path, names: list[str], storage_root: str = "") -> str:
    """The held-out photos the evaluation reads: <out>/holdout, or <storage>/holdout (e.g. on S3) with --storage."""
    if storage_root:
        from vosr import storage

        uri = f"{storage_root.rstrip('/')}/holdout"
        stale = set(storage.list_files(uri)) - {f"{uri}/{n}" for n in names}
        for u in sorted(stale):  # a held-out list that changed since an earlier run: evaluation reads the folder
            storage.delete(u)
        for n in names:
            storage.write_bytes_atomic(f"{uri}/{n}", (PHOTO_DIR / n).read_bytes())
        return uri
    folder = out / "holdout"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for n in names:
        shutil.copy2(PHOTO_DIR / n, folder / n)
    return str(folder)


def record_in_mlflow(chain: Chain, stage: str, res: StageResult, artifacts: list[Path]) -> None:
    """A stage whose job keeps no MLflow run of its own (the serve smoke test) is recorded here, so the demo's
    MLflow store holds every stage: the job's summary numbers as metrics, its outputs as artifacts."""
    from jobkit.config import load_config
    from jobkit.tracking import log_job_run

    cfg = load_config(ROOT / jobs.JOBS[stage].demo_config, [*chain.base_sets(), f"run.output_root={chain.out}"])
    metrics: dict[str, float] = {"stage_seconds": res.seconds}
    for row in res.summary.get("rows", []):
        for k, v in (row.get("metrics") or {}).items():
            if isinstance(v, (int, float)) and v == v:
                metrics[f"{k}.{re.sub(r'[^A-Za-z0-9_.-]+', '_', row['label']).strip('_')}"] = float(v)
    for k in ("seconds", "status"):
        if isinstance(res.summary.get(k), (int, float)):
            metrics[k] = float(res.summary[k])
    log_job_run(cfg, stage, {"command": " ".join(res.command[1:])[:500]}, res.summary, metrics,
                [(a, None) for a in artifacts], tags={"vosr.recorded_by": "demo.chain"})


def make_request_image(out: Path, name: str, size: int = 256, scale: int = 4) -> Path:
    """The endpoint's test request: a bicubic x1/4 of a centre crop of a held-out photo (a small LR image)."""
    from PIL import Image

    folder = out / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(PHOTO_DIR / name) as im:
        im = im.convert("RGB")
        w, h = im.size
        c = min(size, w, h)
        crop = im.crop(((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c))
        lr = crop.resize((c // scale, c // scale), Image.Resampling.BICUBIC)
    path = folder / "request.png"
    lr.save(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    stages = "\n".join(f"  {i}. {job.name:<11} python -m {job.module} --config {job.demo_config}"
                       for i, job in enumerate(jobs.chain(), 1))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"Stages, top to bottom (each one a job of its own):\n{stages}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output root of the demo (default outputs/demo)")
    p.add_argument("--from", dest="start", choices=STAGES, default="curate",
                   help="start at this stage, reusing the earlier stages' outputs")
    p.add_argument("--to", dest="stop", choices=STAGES, default="serve", help="stop after this stage")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra override passed to every stage (repeatable)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--object-store-mb", type=int, default=512, help="object store of the local Ray in MiB")
    p.add_argument("--storage", default="",
                   help="put the stages' data (URL list, curated and feature shards, checkpoints, MLflow artifacts, "
                        "held-out photos, evaluation output) under this URI, e.g. s3://bucket/demo (endpoint from "
                        "AWS_ENDPOINT_URL); default: --out")
    p.add_argument("--max-photos", type=int, default=0,
                   help="serve at most this many (non-held-out) photos on the crawl site (0 = all)")
    p.add_argument("--ray-per-stage", action="store_true",
                   help="let every job start its own local Ray instead of sharing one")
    return p.parse_args(argv)


def prepare_output(args) -> Path:
    """The output root; a chain from the first stage rebuilds every stage's output (the MLflow store stays: run
    history)."""
    out = Path(args.out)
    out = out if out.is_absolute() else (ROOT / out)
    if STAGES.index(args.start) == 0 and out.exists():
        for sub in ("curated", "features", "checkpoints", "eval", "holdout", "serve", "summaries", "logs",
                    "report_assets"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def job_environment(args) -> tuple[dict[str, str], str]:
    """(the environment of the stage jobs, the address of the local Ray they all join: "" with --ray-per-stage).
    The jobs run as `python -m <module>` from the repository root, so they (and, through Ray, their workers)
    import this checkout first."""
    from jobkit.ray_env import DASHBOARDLESS_ENV

    env = dict(os.environ)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if args.ray_per_stage:
        return env, ""
    t0 = time.time()
    ray_address = start_local_ray(args.num_cpus, args.object_store_mb)
    env["RAY_ADDRESS"] = ray_address
    env[DASHBOARDLESS_ENV] = "1"  # the training jobs joining this dashboard-less Ray quiet their workers (ray_env.py)
    # A new local Ray enables token authentication in this process's environment; the jobs need the same mode to
    # join it (the token itself is read from the default token file).
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        if k in os.environ:
            env[k] = os.environ[k]
    log(f"local Ray at {ray_address} ({args.num_cpus} CPUs) started in {time.time() - t0:.0f}s; "
        "every stage joins it")
    return env, ray_address


def serve_photos_and_curate(chain, out: Path, args, holdout: list[str]) -> dict[str, Any]:
    """The curate stage against the project's own photo site on loopback (the held-out photos not served);
    returns what the site served, also kept in summaries/site.json."""
    from demo.photo_server import PhotoServer, list_photos

    exclude = list(holdout)
    if args.max_photos:
        served = [p.name for p in list_photos() if p.name not in holdout]
        exclude += served[args.max_photos:]
    with PhotoServer(exclude=exclude) as site:
        site.write_url_list(out / "urls.txt")
        if args.storage:
            from vosr import storage

            storage.write_bytes_atomic(chain.data_uri("urls.txt"), (out / "urls.txt").read_bytes())
        info = {"base_url": site.base_url, "expected": site.expected(), "urls": len(site.site)}
        log(f"photo site at {site.base_url}: {len(site.site)} URLs {site.expected()}")
        chain.run("curate")
    (out / "summaries" / "site.json").write_text(json.dumps(info))
    return info


class StageWindow:
    """Runs the stages of --from..--to; a stage before --from is not run again, its stored summary is reused."""

    def __init__(self, chain: Chain, start: str, stop: str):
        self.chain, self.first, self.last = chain, STAGES.index(start), STAGES.index(stop)

    def __call__(self, stage: str, run) -> StageResult | None:
        """`run()` runs the stage through the chain; returns the stage's result (None past --to)."""
        idx = STAGES.index(stage)
        if idx < self.first:
            return self.chain.load_previous(stage)
        if idx > self.last:
            return None
        run()
        return self.chain.results[stage]


def teacher_of(pretrain: StageResult | None) -> str:
    """The teacher the later stages load: an FSDP run's unsharded export, else the last checkpoint."""
    summary = pretrain.summary if pretrain else {}
    return summary.get("export_uri") or summary.get("checkpoint_uri", "")


def student_of(distill: StageResult | None) -> str:
    """The registered student (models:/name/version), else the student's checkpoint folder."""
    if distill is None:
        return ""
    s = distill.summary
    student = (s.get("registered_model") or {}).get("uri") or s.get("export_uri") or s.get("checkpoint_uri", "")
    if not student:
        raise SystemExit("the distill summary names neither a registered model nor a checkpoint")
    return student


def distill(chain: Chain, teacher: str) -> None:
    if not teacher:
        raise SystemExit("the pretrain summary names no teacher checkpoint (checkpoint_uri); cannot distill")
    chain.run("distill", [f"distill_job.teacher={teacher}"])


def evaluate(chain: Chain, student: str, teacher: str) -> None:
    """One run: bicubic, the student's one-step row and the teacher's rows at each guidance scale of the sweep
    (an s3:// teacher folder is passed as it is: inference/model_uri.py fetches it into its local cache)."""
    chain.run("evaluate", [f"inference.checkpoint={student}", f"eval.teacher={teacher}"])


def serve(chain: Chain, out: Path, holdout: list[str], student: str) -> None:
    """The endpoint's smoke test: one request of a held-out photo's LR crop; recorded in MLflow here."""
    request = make_request_image(out, holdout[0])
    chain.run("serve", [f"inference.checkpoint={student}"],
              extra_args=["--smoke", str(out / "serve" / "answer.png"), "--image", str(request)])
    record_in_mlflow(chain, "serve", chain.results["serve"], [request, out / "serve" / "answer.png"])


def read_site(out: Path) -> dict[str, Any]:
    """What the photo site served in the curate run (summaries/site.json), {} before one."""
    path = out / "summaries" / "site.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = prepare_output(args)
    t_start = time.time()
    holdout = read_holdout()
    holdout_uri = prepare_holdout(out, holdout, args.storage)
    log(f"output root {out}; {len(holdout)} photos held out of training for evaluation ({holdout_uri}): "
        f"{', '.join(holdout)}")
    env, ray_address = job_environment(args)
    chain = Chain(out, args.set, ray_address, env, args.storage)
    stage = StageWindow(chain, args.start, args.stop)
    teacher = student = ""
    try:
        stage("curate", lambda: serve_photos_and_curate(chain, out, args, holdout))
        stage("precompute", lambda: chain.run("precompute"))
        teacher = teacher_of(stage("pretrain", lambda: chain.run("pretrain")))
        student = student_of(stage("distill", lambda: distill(chain, teacher)))
        stage("evaluate", lambda: evaluate(chain, student, teacher))
        stage("serve", lambda: serve(chain, out, holdout, student))
    finally:
        if ray_address:
            import ray

            ray.shutdown()
    total = time.time() - t_start
    from demo.report import write_report

    paths = write_report(out, read_site(out), holdout, total, teacher=teacher, student=student)
    log(f"chain ({args.start} .. {args.stop}) done in {total / 60:.1f} min; report: {paths['md']} and "
        f"{paths['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
