"""Secrets: one redaction for every place a config goes, keys never from argv, no public bind without a
key. No Ray: real MLflow (sqlite), real checkpoint files, the real `vosr config` command."""

from __future__ import annotations

import json

import pytest
import yaml

from jobkit.config import ConfigError, config_from_dict, redact
from vosr.config import redact_text

KEY = "k3y-that-must-never-be-written"
PASSWORD = "hunter2-tracking-password"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"


def secret_config(tmp_path):
    """A config holding an API key (from a config file) and credentials inside URIs."""
    return config_from_dict({
        "serve": {"api_key": KEY},
        "precompute": {"input": f"s3://{AWS_ID}:{PASSWORD}@bucket/curated"},
        "eval": {"hr_dir": f"https://bob:{PASSWORD}@data.example.org/hr?X-Amz-Signature=abc123&page=2"},
        "train": {"storage_path": str(tmp_path / "ckpt")},
        "run": {"output_root": str(tmp_path), "name": "secret-run",
                "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}},
    })


def assert_clean(text: str) -> None:
    for secret in (KEY, PASSWORD, AWS_ID, "abc123"):
        assert secret not in text, (secret, text[:2000])


def test_redact_text_and_structures():
    assert redact_text("http://user:pw@host:5000/x") == "http://user:***@host:5000/x"
    assert redact_text("https://ghp_token@github.com/o/r") == "https://***@github.com/o/r"
    assert redact_text("s3://bucket/key?X-Amz-Credential=a%2Fb&X-Amz-Signature=f00&x=1") == \
        "s3://bucket/key?X-Amz-Credential=***&X-Amz-Signature=***&x=1"
    assert redact_text(f"id {AWS_ID} AWS_SECRET_ACCESS_KEY=wJalr/K7MDENG") == "id *** AWS_SECRET_ACCESS_KEY=***"
    assert redact_text("s3://bucket/folder/file.png") == "s3://bucket/folder/file.png"     # nothing to hide
    flat = redact({"serve.api_key": "x", "serve.api_key_env": "VOSR_API_KEY", "password": "p", "n": 3,
                   "nested": {"token": "t", "uris": ["http://a:b@h/"]}})
    assert flat == {"serve.api_key": "***", "serve.api_key_env": "VOSR_API_KEY", "password": "***", "n": 3,
                    "nested": {"token": "***", "uris": ["http://a:***@h/"]}}


def test_secret_keys_are_refused_on_the_command_line(capsys):
    from jobkit.cli import main

    with pytest.raises(ConfigError, match="cannot be set on the command line"):
        config_from_dict({}, [f"serve.api_key={KEY}"])
    assert main(["config", "--set", f"serve.api_key={KEY}"]) == 2
    err = capsys.readouterr().err
    assert "serve.api_key cannot be set on the command line" in err and "serve.api_key_env" in err
    assert KEY not in err
    from inference.serve import main as serve_main

    with pytest.raises(SystemExit) as exc:
        serve_main(["--set", f"serve.api_key={KEY}"])
    assert exc.value.code == 2


def test_vosr_config_prints_no_secret(tmp_path, capsys):
    from jobkit.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"serve": {"api_key": KEY},
                                        "run": {"mlflow": {"tracking_uri": f"http://vosr:{PASSWORD}@mlflow:5000"}}}))
    assert main(["config", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert_clean(out)
    printed = yaml.safe_load(out)
    assert printed["serve"]["api_key"] == "***"
    assert printed["run"]["mlflow"]["tracking_uri"] == "http://vosr:***@mlflow:5000"


def test_checkpoint_and_registry_metadata_hold_no_secret(tmp_path):
    import torch

    from training.registry import _inference_copy
    from vosr.checkpoint import load_checkpoint, save_checkpoint
    from vosr.model import build_dit

    cfg = secret_config(tmp_path)
    torch.manual_seed(0)
    folder = tmp_path / "ckpt-secret"
    save_checkpoint(str(folder), cfg, build_dit(cfg, student=True), extra={"source": cfg.precompute.input})
    text = (folder / "config.json").read_text()
    assert_clean(text)
    assert json.loads(text)["config"]["serve"]["api_key"] == "***"
    _, loaded, _ = load_checkpoint(str(folder))                     # still loads
    assert loaded.model == cfg.model
    # a checkpoint written before redaction existed: the registry's copy is cleaned
    meta = json.loads(text)
    meta["config"]["serve"]["api_key"] = KEY
    (folder / "config.json").write_text(json.dumps(meta))
    copy = _inference_copy(str(folder), tmp_path / "registry-copy")
    assert_clean((copy / "config.json").read_text())


def test_mlflow_run_params_and_summary_hold_no_secret(tmp_path):
    from mlflow.tracking import MlflowClient

    from training.job import finish, resolve_run, start_tracking

    cfg = secret_config(tmp_path)
    paths = resolve_run(cfg)
    uri, run_id = start_tracking(cfg, paths, "pretrain")
    client = MlflowClient(uri)
    params = client.get_run(run_id).data.params
    assert params["serve.api_key"] == "***" and params["serve.api_key_env"] == "VOSR_API_KEY"
    assert params["precompute.input"] == "s3://***:***@bucket/curated"
    assert_clean(json.dumps(params))
    finish(paths, {"steps": 1, "input": cfg.precompute.input, "eval": cfg.eval.hr_dir}, uri, run_id)
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert_clean(open(local).read())
    assert_clean((tmp_path / "ckpt" / "secret-run").joinpath("summary.json").read_text())
    # a resubmission finds its run again although the stored tracking URI is redacted
    assert start_tracking(cfg, paths, "pretrain")[1] == run_id


def test_public_bind_without_a_key_refuses_to_start(tmp_path, monkeypatch):
    import socket

    from inference.serve import ServeStartError, access_digests, key_digest, start

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("VOSR_API_KEY", raising=False)
    cfg = config_from_dict({}, ["serve.host=0.0.0.0", f"serve.port={port}"])
    with pytest.raises(ServeStartError, match="without an API key"):
        start(cfg)                                                      # refused before anything listens
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert access_digests(config_from_dict({}, ["serve.host=0.0.0.0", "serve.allow_anonymous=true"])) == []
    assert access_digests(config_from_dict({}, ["serve.host=127.0.0.1"])) == []
    assert access_digests(config_from_dict({}, ["serve.host=::1"])) == []
    monkeypatch.setenv("VOSR_API_KEY", KEY)
    assert access_digests(cfg) == [key_digest(KEY)]
    key_file = tmp_path / "keys"
    key_file.write_text("# rotated\nfirst-key-from-a-secret\n\nsecond-key-from-a-secret\n")
    digests = access_digests(config_from_dict({}, ["serve.host=0.0.0.0", f"serve.api_key_file={key_file}",
                                                   "serve.api_key_env="]))
    assert digests == sorted(key_digest(k) for k in ("first-key-from-a-secret", "second-key-from-a-secret"))
    monkeypatch.setenv("VOSR_API_KEY", "short")
    with pytest.raises(ServeStartError, match="16 characters"):
        access_digests(cfg)
    with pytest.raises(ServeStartError, match="does not exist"):
        access_digests(config_from_dict({}, [f"serve.api_key_file={tmp_path / 'missing'}"]))
