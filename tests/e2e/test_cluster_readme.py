"""The README's "On a cluster" section, run as written, on this machine: a Ray head and a worker started by
`ray start` from the project's environment with token authentication, the five jobs chained through
`ray job submit` (curate -> precompute -> pretrain -> distill -> evaluate) against an `mlflow server` process and
a moto S3 server on loopback, then the endpoint deployed with `serve start` + `serve run inference.serve:app` and
asked once with curl. It is the suite's one full chain: the demo's own steps after the jobs (`python -m demo --from
evaluate` with `--storage` on the same S3 data: held-out photos on S3, its evaluation of the s3:// teacher through
the model cache, the endpoint's smoke test, the report) run on what the chain left, from the jobs' summaries.

The commands come from the README (the indented code blocks between <!-- cluster-begin --> and
<!-- cluster-end -->, read by tests/helpers/readme.py; their shape is checked without running them in
tests/unit/test_readme_cluster_section.py) and run one after the other in one bash session, so `source`, `export`
and variables carry over as when pasted. What the test changes, and only this:

- the settings the README asks the reader to fill in (HEAD, DATA, URLS, HR, MLFLOW) get loopback values: DATA
  and HR on the moto S3 server, URLS a URL list (on S3) of the demo's photo site (demo/photo_server.py, 8 photos);
  TEACHER and STUDENT, which the README says to take from the pretrain and distill summaries, are taken from them;
- `configs/cluster/` -> `configs/demo/`, the README's own rule for a one-machine trial, and every job gets the
  `--set` overrides of TINY (a one-block DiT at 32 px, 4 steps, 2 evaluation images) so the chain takes ~2 min;
- ports and addresses: 6379, 8265 and 8000 become free ports, 0.0.0.0 becomes 127.0.0.1, and `ray start` gets
  `--node-ip-address 127.0.0.1`, 2 CPUs (head; none on the worker), a capped object store, free ports for the
  dashboard agent (Ray's fixed default 52365 is held by any other Ray on the machine) and the client server, and
  a `--temp-dir` of its own for each node, so nothing here touches another Ray on this machine and each node keeps
  its own logs as on two machines (with one folder, both nodes' log monitors would send every line twice);
- `lr.png` / `lr_x4.png` of the curl line become a small request image and an answer path in the test's folder.

The shell runs with its own HOME (so `ray get-auth-token --generate` writes a token of its own, not
~/.ray/auth_token) and with the AWS variables of the moto server exported before `ray start`, as the README says
for S3 credentials. At the end every process the session started is stopped by its process group (the session is
a new one), never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.curate_schema import CURATED_SCHEMA
from tests.helpers.http_fixture import free_port
from tests.helpers.mlflow_server import MLFLOW_SERVER_ENV
from tests.helpers.readme import job_of, readme_commands

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("HEAD", "DATA", "URLS", "HR", "MLFLOW")
# small enough for ~2 minutes on 2 CPUs; the demo's stages after the jobs keep their evaluation images (report)
DEMO_TINY = ["data.resolution=32", "semantic.input_size=32", "model.hidden_size=32", "model.depth=1",
             "model.num_heads=2", "model.patch_size=1", "precompute.variants=1", "train.steps=4", "train.batch_size=4",
             "train.checkpoint_every=2", "train.log_every=1", "eval.max_images=2", "eval.crop=64",
             "eval.sweep_steps=2", "eval.guidance_sweep=[0.0, 1.0]"]
TINY = [*DEMO_TINY, "eval.save_images=false"]
N_PHOTOS = 8
CLEANER_WARNING = "Failed to query Ray Train Controller actor state"
PROGRESS = re.compile(r"\[(pretrain|distill)\] step (\d+)/(\d+) \(([\d.]+)%\) \| loss ([\d.]+) \| ([\d.]+) samples/s "
                      r"\| ETA (\d+:\d\d:\d\d) \| last checkpoint: (step \d+|none yet)")


# --- a persistent bash session -------------------------------------------------------------------------------------

class Shell:
    """One bash process fed the commands in turn (state carries over, as in a terminal), in a new session so that
    everything it starts (Ray's daemons included) can be stopped by its process group."""

    def __init__(self, env: dict[str, str], log: Path):
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, cmd: str, timeout: float) -> tuple[int, str]:
        marker = f"__vosr_done_{uuid.uuid4().hex}__"
        assert self.proc.stdin is not None
        self.log.write(f"\n$ {cmd}\n")
        # braces: run in this shell (assignments stay); stdin from /dev/null so no command eats the next ones
        self.proc.stdin.write(f"{{\n{cmd}\n}} </dev/null\necho {marker} $?\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"still running after {timeout:.0f} s: {cmd}\n{''.join(out)[-4000:]}") from None
            if line is None:
                raise AssertionError(f"the shell ended during: {cmd}\n{''.join(out)[-4000:]}")
            if line.startswith(marker):
                self.log.flush()
                return int(line.split()[1]), "".join(out)
            out.append(line)
            self.log.write(line)

    def stop(self) -> None:
        """Stop the session's process group: bash and every process started from it that kept the group (Ray's
        daemons and workers, Serve's actors). SIGTERM, then SIGKILL for what is left."""
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
        self.proc.wait(timeout=10)
        self.log.close()


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# --- the test's substitutions --------------------------------------------------------------------------------------

ASSIGN = re.compile(r"^(export\s+)?([A-Z][A-Z0-9_]*)=(\S*)(\s+#.*)?$")


def adapt(cmd: str, values: dict[str, str], ports: dict[str, int], extra: dict[str, list[str]]) -> str:
    m = ASSIGN.match(cmd)
    if m and m.group(2) in values:
        return f"{m.group(1) or ''}{m.group(2)}={shlex.quote(values[m.group(2)])}"
    cmd = cmd.replace("configs/cluster/", "configs/demo/").replace("0.0.0.0", "127.0.0.1")
    for default, port in (("6379", ports["gcs"]), ("8265", ports["dashboard"]), ("8000", ports["serve"])):
        cmd = re.sub(rf"\b{default}\b", str(port), cmd)
    if cmd.startswith("ray start --head"):
        cmd += " " + " ".join(extra["head"])
    elif cmd.startswith("ray start --address"):
        cmd += " " + " ".join(extra["worker"])
    elif job_of(cmd):
        cmd += "".join(f" --set {shlex.quote(s)}" for s in TINY)
    elif cmd.startswith("curl "):
        cmd = cmd.replace("@lr.png", f"@{values['lr.png']}").replace("-o lr_x4.png", f"-o {values['lr_x4.png']}")
    return cmd


def last_json(text: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from demo.chain import last_json_object

    found = last_json_object(text)
    assert found, text[-3000:]
    return found


def check_progress(outputs: dict[str, str]) -> None:
    """The training jobs' progress as the submitter sees it: one line per train.log_every (1) of the 4 steps, with
    the last checkpoint (checkpoint_every 2) and an ETA reaching 0; and no job's log holds the warning Ray Train's
    placement-group cleaner repeats every second when it cannot reach a dashboard."""
    for job in ("pretrain", "distill"):
        text = outputs[job]
        found = [m.groups() for m in PROGRESS.finditer(text) if m.group(1) == job]
        assert [int(g[1]) for g in found] == [1, 2, 3, 4] and all(g[2] == "4" for g in found), text[-3000:]
        assert [g[7] for g in found] == ["none yet", "step 2", "step 2", "step 4"], found
        assert found[-1][6] == "0:00:00" and float(found[0][5]) > 0
    for name, text in outputs.items():
        assert CLEANER_WARNING not in text, name


def seed_demo_summaries(out: Path, outputs: dict[str, str], site: dict) -> None:
    """The demo's record of the stages before --from, as `python -m demo` writes it (summaries/<stage>.json: the
    summary JSON each job printed last; summaries/site.json: what the photo site served), here from the chain's own
    jobs, so that `python -m demo --from evaluate` goes on from them."""
    (out / "summaries").mkdir(parents=True)
    (out / "logs").mkdir()
    for stage in ("curate", "precompute", "pretrain", "distill"):
        (out / "logs" / f"{stage}.log").write_text(outputs[stage])
        (out / "summaries" / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "command": ["ray", "job", "submit", stage], "seconds": 0.0, "returncode": 0,
             "summary": last_json(outputs[stage])}))
    (out / "summaries" / "site.json").write_text(json.dumps(site))


# --- servers -------------------------------------------------------------------------------------------------------

def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url}: the server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def test_readme_cluster_section_runs_verbatim(tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from demo.chain import read_holdout
    from demo.photo_server import PhotoServer, list_photos
    from tests.helpers.s3_fixture import s3_server

    commands = readme_commands()
    holdout = read_holdout()
    photos = [p for p in list_photos() if p.name not in holdout][:N_PHOTOS]
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    for p in photos:
        shutil.copy(p, site_dir / p.name)
    request = tmp_path / "lr.png"
    with Image.open(ROOT / "assets" / "photos" / holdout[0]) as im:
        im.convert("RGB").crop((0, 0, 128, 128)).resize((32, 32), Image.Resampling.BICUBIC).save(request)

    ports = {"gcs": free_port(), "dashboard": free_port(), "serve": free_port()}
    # Ray's socket paths under --temp-dir must stay under 107 bytes: pytest's tmp_path is too deep. The head's
    # folder is Ray's default one of the shell (RAY_TMPDIR/ray): the "latest cluster" file `ray start` writes there
    # is where the cluster's processes that look for it without an address (Ray Train's placement-group cleaner)
    # read it, so they find this cluster and not another Ray running on the machine.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="vosr-ray-", dir="/tmp"))
    temp_dir = ray_tmpdir / "ray"
    worker_temp_dir = Path(tempfile.mkdtemp(prefix="vosr-ray-w-", dir="/tmp"))
    home = tmp_path / "home"
    home.mkdir()
    common = ["--node-ip-address 127.0.0.1", f"--object-store-memory {200 * 2**20}"]
    extra = {"head": [*common, "--num-cpus 2", f"--temp-dir {temp_dir}", f"--ray-client-server-port {free_port()}",
                      f"--dashboard-agent-listen-port {free_port()}"],
             # the worker joins without CPUs: the machine has 2 cores, all given to the head as in the other tests
             "worker": [*common, "--num-cpus 0", f"--temp-dir {worker_temp_dir}",
                        f"--dashboard-agent-listen-port {free_port()}"]}

    mlflow_port = free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    mlflow_proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination",
         str(tmp_path / "mlflow-artifacts"), "--workers", "1"], env={**os.environ, **MLFLOW_SERVER_ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shell = None
    timings: dict[str, float] = {}
    outputs: dict[str, str] = {}
    ended = False  # every command ran and passed its checks
    try:
        with s3_server() as s3, PhotoServer(photo_dir=site_dir) as site:
            site.write_url_list(tmp_path / "urls.txt")
            site_expected = site.expected()
            urls = s3.put_file(tmp_path / "urls.txt", "cluster/urls.txt")
            for name in holdout[:2]:
                s3.put_file(ROOT / "assets" / "photos" / name, f"hr/{name}")

            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "VIRTUAL_ENV", "PYTHONPATH", "VOSR_"))}
            env.update({"HOME": str(home), "RAY_TMPDIR": str(ray_tmpdir), "AWS_ENDPOINT_URL": s3.endpoint_url,
                        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url, "RAY_USAGE_STATS_ENABLED": "0",
                        "MPLCONFIGDIR": str(tmp_path / "mpl")})
            # s3_server() put the moto credentials in os.environ: the shell exports them before `ray start`
            values = {"HEAD": "127.0.0.1", "DATA": s3.uri("cluster"), "URLS": urls, "HR": s3.uri("hr"),
                      "MLFLOW": mlflow_url, "lr.png": str(request), "lr_x4.png": str(tmp_path / "lr_x4.png")}
            shell = Shell(env, tmp_path / "session.log")
            for cmd in commands:
                job = job_of(cmd)
                if job and not outputs:  # the tracking server started meanwhile
                    _wait_http(mlflow_url + "/health", mlflow_proc, timeout=120)
                line = adapt(cmd, values, ports, extra)
                t0 = time.monotonic()
                rc, out = shell.run(line, timeout=300)
                timings[job or line.split()[0]] = timings.get(job or line.split()[0], 0) + time.monotonic() - t0
                assert rc == 0, f"exit status {rc}: {line}\n{out[-5000:]}"
                if job:
                    assert re.search(r"Job '\S+' succeeded", out), out[-3000:]
                    # a Ray job joined this cluster (RAY_ADDRESS from the job supervisor), not a Ray of its own;
                    # evaluate is plain PyTorch in the job's process and starts no Ray at all
                    if job != "evaluate":
                        assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{ports['gcs']}\b",
                                         out), out[-3000:]
                    assert "Started a local Ray instance" not in out
                    outputs[job] = out
                if job == "pretrain":  # the README: TEACHER is the pretrain summary's checkpoint_uri
                    values["TEACHER"] = last_json(out)["checkpoint_uri"]
                if job == "distill":  # STUDENT is the distill summary's registered_model.uri
                    values["STUDENT"] = last_json(out)["registered_model"]["uri"]
                if line.startswith("ray start --address"):  # the worker joined the head
                    deadline = time.monotonic() + 60
                    while True:
                        rc, status = shell.run(f"ray status --address 127.0.0.1:{ports['gcs']}", timeout=60)
                        if rc == 0 and status.count(" node_") == 2 or time.monotonic() > deadline:
                            break
                        time.sleep(2)
                    assert rc == 0 and status.count(" node_") == 2, status

            # a submitted job refuses a relative path for what it writes, naming the key, before doing anything
            rc, refused = shell.run(
                f"ray job submit --address http://127.0.0.1:{ports['dashboard']} --working-dir . -- python "
                f"pipelines/curate.py --config configs/demo/curate.yaml --set curate.output=relative/curated",
                timeout=120)
            assert rc != 0 and "curate.output='relative/curated' is a relative path" in refused, refused[-3000:]

            # the endpoint answered with a 4x PNG; without the key it refuses
            with Image.open(tmp_path / "lr_x4.png") as im:
                assert im.format == "PNG" and im.size == (128, 128)
            req = urllib.request.Request(f"http://127.0.0.1:{ports['serve']}/upscale", data=request.read_bytes(),
                                         method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=60)
            assert err.value.code == 401

            # each job's outputs are on S3 (the credentials came from the nodes' environment)
            keys = s3.keys("cluster/")
            curated_summary = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="cluster/curated/summary.json")
                                         ["Body"].read())
            shard = s3.fs.open(s3.uri(next(k for k in keys if k.startswith("cluster/curated/shards/")
                                           and k.endswith(".parquet"))).removeprefix("s3://"), "rb")
            with shard:
                assert pq.read_schema(shard).equals(CURATED_SCHEMA, check_metadata=False)
            for prefix in ("curated/shards/", "features/shards/", "checkpoints/demo-teacher/",
                           "checkpoints/demo-student/", "eval/summary.json", "mlartifacts/"):
                assert any(k.startswith(f"cluster/{prefix}") for k in keys), (prefix, keys[:50])

            # the runs and the registered student are on the tracking server
            client = MlflowClient(tracking_uri=mlflow_url)
            exp = client.get_experiment_by_name("vosr-demo")
            assert exp is not None
            runs = client.search_runs([exp.experiment_id])
            by_name = {r.info.run_name: r for r in runs}
            for name in ("demo-curate-curate", "demo-precompute-precompute", "demo-teacher", "demo-student",
                         "demo-evaluate-eval"):
                assert name in by_name and by_name[name].info.status == "FINISHED", sorted(by_name)
            student = last_json(outputs["distill"])["registered_model"]
            version = client.get_model_version(student["name"], str(student["version"]))
            assert version.run_id == by_name["demo-student"].info.run_id
            assert last_json(outputs["pretrain"])["steps"] == 4
            curate = last_json(outputs["curate"])
            assert curate == curated_summary  # the job printed its summary last
            assert (curate["kept"], curate["duplicates"]) == (N_PHOTOS, site_expected["near_duplicate"])
            assert "[curate] stage 1 block" in outputs["curate"]  # its progress reached the submitter
            assert re.search(r"Uploading package gcs://_ray_pkg_\w+\.zip", outputs["curate"])  # --working-dir .

            # every stage's data went to S3, in the layout the demo's --storage uses too
            assert under(keys, "curated/shards/", ".parquet") and under(keys, "curated/summary.json")
            assert under(keys, "features/shards/", ".parquet") and under(keys, "features/_vosr_features.json")
            assert under(keys, "checkpoints/demo-teacher/checkpoint_", "model.safetensors")
            assert under(keys, "checkpoints/demo-student/checkpoint_", "model.safetensors")
            assert under(keys, "eval/summary.json") and under(keys, "eval/table.md")
            assert under(keys, "eval/guidance_sweep.png")
            assert curate["seen"] == 15 and (curate["kept"], curate["duplicates"]) == (8, 4)  # 8 photos, 7 copies
            assert last_json(outputs["pretrain"])["checkpoint_uri"].startswith(f"{values['DATA']}/checkpoints/")
            assert student["uri"].startswith("models:/vosr-demo-student/")
            check_progress(outputs)

            # the demo's stages after the jobs (`python -m demo --from evaluate`, data on the same S3 root): they go
            # on from the jobs' summaries, with the student from the tracking server; the cluster is stopped first
            shell.stop()
            shell = None
            demo = tmp_path / "demo"
            seed_demo_summaries(demo, outputs, {"base_url": site.base_url, "expected": site_expected,
                                                "urls": len(site.site)})
            demo_env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
                        "RAY_USAGE_STATS_ENABLED": "0", "VOSR_MODEL_CACHE": str(tmp_path / "model-cache")}
            cmd = [sys.executable, "-m", "demo", "--out", str(demo), "--storage", values["DATA"], "--from", "evaluate",
                   "--set", f"run.mlflow.tracking_uri={mlflow_url}"]
            for item in DEMO_TINY:
                cmd += ["--set", item]
            t0 = time.monotonic()
            proc = subprocess.run(cmd, cwd=ROOT, env=demo_env, capture_output=True, text=True, timeout=600)
            timings["demo --from evaluate"] = time.monotonic() - t0
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
            keys = s3.keys("cluster/")
            ev = json.loads(s3.client.get_object(Bucket=s3.bucket, Key="cluster/eval/summary.json")["Body"].read())
        ended = True
    finally:
        if shell is not None:
            shell.stop()
        _stop_group(mlflow_proc)
        if ended:
            shutil.rmtree(ray_tmpdir, ignore_errors=True)
            shutil.rmtree(worker_temp_dir, ignore_errors=True)
        else:
            print(f"Ray's logs are kept in {temp_dir} and {worker_temp_dir}")
        print("seconds per command:", json.dumps({k: round(v, 1) for k, v in timings.items()}))

    # the demo put the held-out photos and its evaluation on S3, nothing of it locally
    assert len(under(keys, "holdout/")) == 6
    for name in ("curated", "features", "checkpoints", "mlartifacts", "holdout", "eval", "teacher_checkpoint"):
        assert not (demo / name).exists(), f"{name} was written locally"
    summaries = {p.stem: json.loads(p.read_text()) for p in (demo / "summaries").glob("*.json")}
    assert summaries["evaluate"]["summary"]["summary_json"] == s3.uri("cluster/eval/summary.json")
    assert ev["table"] == s3.uri("cluster/eval/table.md") and ev["data"]["hr_dir"] == s3.uri("cluster/holdout")
    assert ev["models"]["teacher"] == summaries["pretrain"]["summary"]["checkpoint_uri"]
    cached = [json.loads(p.read_text())["uri"] for p in (tmp_path / "model-cache").glob("*/SOURCE.json")]
    assert cached == [ev["models"]["teacher"]]          # the s3:// teacher went through the model cache
    kinds = {r["group"] for r in ev["rows"]}
    assert kinds == {"Baseline", "Multi-step", "One-step"} and ev["data"]["images"] == 2
    assert all(r["metrics"]["psnr"] > 5 for r in ev["rows"])
    for log in (demo / "logs").glob("*.log"):
        assert CLEANER_WARNING not in log.read_text(), log.name
    with Image.open(demo / "serve" / "request.png") as a, Image.open(demo / "serve" / "answer.png") as b:
        assert b.size == (4 * a.size[0], 4 * a.size[1])
    report = (demo / "report.md").read_text()
    assert "## Evaluation on the held-out photos" in report and "mlflow ui --backend-store-uri" in report
    bicubic = next(r for r in ev["rows"] if r["group"] == "Baseline")["metrics"]["psnr"]
    assert f"{bicubic:.3f}" in report                        # the report's table comes from the JSON on S3
    assert (demo / "report_assets" / "guidance_sweep.png").is_file()
    assert (demo / "report.html").read_text().startswith("<!doctype html>")


def under(keys: list[str], prefix: str, suffix: str = "") -> list[str]:
    """The S3 keys of the chain's data root (DATA = s3://<bucket>/cluster) under `prefix`, ending with `suffix`."""
    return [k for k in keys if k.startswith(f"cluster/{prefix}") and k.endswith(suffix)]
