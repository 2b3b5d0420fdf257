"""The registered student as an MLflow pyfunc model that serves, on a real MLflow sqlite store and registry:
loaded back through models:/name@champion it returns the same x4 images as `vosr upscale`; `mlflow models serve
--env-manager local` (a real process on a free loopback port) answers /invocations with them; the version carries
its tags; the CLI resolves models:/ against MLFLOW_TRACKING_URI alone and downloads each version once into a cache
keyed by name and version, leaving no temporary folder."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.env import restored_environ
from tests.helpers.http_fixture import free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAME = "tiny-student"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A tiny random student registered the way distillation registers it: tags and the champion alias."""
    from training.registry import register_student

    root = tmp_path_factory.mktemp("mlflow")
    folder = make_checkpoint(root / "student", student=True)
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    import mlflow

    mlflow.set_tracking_uri(tracking)
    exp = mlflow.create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        run_id = run.info.run_id
    version = register_student(folder, NAME, tracking, run_id, alias="champion",
                               tags={"vosr.preset": "tiny", "vosr.steps": 40, "vosr.training_run": run_id,
                                     "vosr.data_version": "abc123"})
    return {"root": root, "tracking": tracking, "version": version, "run_id": run_id, "folder": folder}


@pytest.fixture(scope="module")
def lr_png(photos, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lr") / "photo.png"
    Image.open(photos[1]).convert("RGB").resize((22, 17), Image.BICUBIC).save(path)
    return path


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_registered_version_has_signature_tags_and_alias(registry):
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    client = MlflowClient(registry["tracking"])
    mv = client.get_model_version_by_alias(NAME, "champion")
    assert int(mv.version) == registry["version"]
    assert mv.tags["vosr.preset"] == "tiny" and mv.tags["vosr.steps"] == "40"
    assert mv.tags["vosr.training_run"] == registry["run_id"] and mv.tags["vosr.data_version"] == "abc123"
    import mlflow

    mlflow.set_tracking_uri(registry["tracking"])
    info = get_model_info(f"models:/{NAME}@champion")
    sig = info.signature
    assert [c.type.name for c in sig.inputs.inputs] == ["string"]
    assert [c.name for c in sig.outputs.inputs] == ["image", "width", "height"]
    assert {p.name for p in sig.params.params} == {"seed", "steps", "guidance", "tile", "color_fix"}
    assert info.saved_input_example_info is not None


def test_pyfunc_from_champion_equals_the_cli(registry, lr_png, tmp_path):
    import mlflow

    from inference.upscale import main

    mlflow.set_tracking_uri(registry["tracking"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [_b64(lr_png)]}), params={"seed": 7})
    assert list(out.columns) == ["image", "width", "height"]
    assert (int(out["width"][0]), int(out["height"][0])) == (88, 68)
    sr = _pixels(out["image"][0])
    assert sr.shape == (68, 88, 3)
    other = _pixels(model.predict([_b64(lr_png)], params={"seed": 8})["image"][0])
    assert not np.array_equal(sr, other), "the seed parameter must reach the sampler"

    # the CLI on the same file and seed, resolving models:/ from MLFLOW_TRACKING_URI alone (no run.mlflow key),
    # from a working folder where it must not create ./outputs
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    work.mkdir()
    with restored_environ(["MLFLOW_TRACKING_URI", "VOSR_MODEL_CACHE"]):
        os.environ["MLFLOW_TRACKING_URI"] = registry["tracking"]
        os.environ["VOSR_MODEL_CACHE"] = str(cache)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            args = [str(lr_png), str(tmp_path / "out"), "--checkpoint", f"models:/{NAME}@champion", "--seed", "7",
                    "--no-progress"]
            assert main(args) == 0
            cached = sorted(p.relative_to(cache) for p in cache.rglob("SOURCE.json"))
            assert main([*args, "--overwrite"]) == 0     # the second run reuses the cached version
        finally:
            os.chdir(cwd)
    assert not (work / "outputs").exists(), "MLFLOW_TRACKING_URI must be used, not a default store under ./outputs"
    cli = np.asarray(Image.open(tmp_path / "out" / "photo.png").convert("RGB"))
    assert np.array_equal(cli, sr)
    # one cache folder per (name, version), nothing else left behind (no temporary folders)
    assert cached == sorted(p.relative_to(cache) for p in cache.rglob("SOURCE.json"))
    assert [str(p) for p in cached] == [f"mlflow/{NAME}/" + p.parent.name + "/SOURCE.json" for p in cached]
    assert len(cached) == 1 and cached[0].parent.name.startswith(f"v{registry['version']}-")
    assert not [p for p in cache.rglob(".*") if p.is_dir()], "a temporary download folder was left behind"
    # the Python API on the same URI, with the tracking URI given explicitly: the same cached version, same pixels
    from vosr import Upscaler

    up = Upscaler.from_pretrained(f"models:/{NAME}@champion", tracking_uri=registry["tracking"], cache_dir=cache)
    assert Path(up.checkpoint).is_relative_to(cache / "mlflow" / NAME)
    assert np.array_equal(np.asarray(up(Image.open(lr_png), seed=7)), sr)
    assert cached == sorted(p.relative_to(cache) for p in cache.rglob("SOURCE.json"))


def test_mlflow_models_serve_answers_invocations(registry, lr_png, tmp_path):
    """`mlflow models serve --env-manager local` in its own process, from a folder outside the repository and
    without PYTHONPATH: the model must load from what it carries (vosr in code_paths)."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(registry["tracking"])
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"image": [_b64(lr_png)]}), params={"seed": 5})["image"][0]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    venv_bin = str(Path(sys.executable).parent)      # mlflow starts uvicorn by name
    env.update(MLFLOW_TRACKING_URI=registry["tracking"], OMP_NUM_THREADS="1",
               PATH=venv_bin + os.pathsep + env.get("PATH", ""))
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{NAME}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"mlflow models serve did not come up:\n{(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[_b64(lr_png)]]},
                           "params": {"seed": 5}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        row = answer["predictions"][0]
        assert (row["width"], row["height"]) == (88, 68)
        assert np.array_equal(_pixels(row["image"]), _pixels(expected))
        # a row that is not an image is refused with an error naming it, and the server keeps serving
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=bad, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code in (400, 500) and b"row 0" in err.value.read()
        with urllib.request.urlopen(f"{base}/ping", timeout=5) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_mlflow_uris_follow_the_config_then_mlflow_environment(tmp_path, monkeypatch):
    from jobkit.config import config_from_dict
    from jobkit.tracking import resolve_artifact_location, resolve_registry_uri, resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    cfg = config_from_dict({}, [f"run.output_root={tmp_path / 'out'}"])
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"       # the local default
    assert resolve_registry_uri(cfg) == resolve_tracking_uri(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:////srv/registry.db")
    fresh = config_from_dict({}, [f"run.output_root={tmp_path / 'other'}"])
    assert resolve_tracking_uri(fresh) == "http://127.0.0.1:5999" and not (tmp_path / "other").exists()
    assert resolve_registry_uri(fresh) == "sqlite:////srv/registry.db"
    assert resolve_artifact_location(fresh) == ""             # a tracking server chooses its artifact store
    given = config_from_dict({}, ["run.mlflow.tracking_uri=sqlite:////a.db", "run.mlflow.registry_uri=sqlite:////b.db"])
    assert (resolve_tracking_uri(given), resolve_registry_uri(given)) == ("sqlite:////a.db", "sqlite:////b.db")


def test_distillation_tags_say_what_the_student_is_and_where_it_came_from():
    """The tags training/distill.py puts on the version it registers (the full job:
    tests/e2e/test_distill_job.py)."""
    from jobkit.config import load_config
    from training.registry import version_tags

    cfg = load_config(ROOT / "configs/distill/tiny.yaml", ["train.features=s3://key:secret@bucket/features"])
    tags = version_tags(cfg, {"steps": 40, "data": {"version": "0123456789ab"}}, "run-1")
    assert tags["vosr.preset"] == "tiny" and tags["vosr.steps"] == 40 and tags["vosr.training_run"] == "run-1"
    assert tags["vosr.data_version"] == "0123456789ab" and tags["vosr.method"] == cfg.distill.method
    assert tags["vosr.inference_steps"] == cfg.distill.onestep_steps and "secret" not in tags["vosr.data"]
    assert cfg.distill_job.register_alias == "champion"


def test_models_uri_downloads_from_the_given_registry_not_the_process_default(registry, tmp_path):
    """A Ray job's process has no MLflow URI of its own (MLflow's default is a sqlite file in the job's working
    directory): a models:/ URI resolved with an explicit registry must download from that registry."""
    import mlflow

    from vosr.model_uri import resolve

    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(elsewhere)
    mlflow.set_registry_uri(elsewhere)
    try:
        folder = resolve(f"models:/{NAME}/{registry['version']}", tracking_uri=registry["tracking"],
                         registry_uri=registry["tracking"], cache_root=tmp_path / "cache")
    finally:
        mlflow.set_tracking_uri(registry["tracking"])
        mlflow.set_registry_uri(registry["tracking"])
    assert (folder / "model.safetensors").read_bytes() == (Path(registry["folder"]) / "model.safetensors").read_bytes()
