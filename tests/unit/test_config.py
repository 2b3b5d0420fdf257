import subprocess
import sys

import pytest

from jobkit.config import PRESETS, ConfigError, config_from_dict, explain_config, load_config


def test_presets_fill_method_sections():
    cfg = config_from_dict({"preset": "vosr-0.5b"})
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == (1024, 28, 16)
    assert cfg.autoencoder.name == "sd21" and cfg.semantic.name == "dinov2_vitb14" and cfg.semantic.layer == 8
    cfg = config_from_dict({"preset": "vosr-1.4b"})
    assert (cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads) == (1536, 36, 24)
    assert cfg.autoencoder.name == "qwen2d" and cfg.semantic.layer == 17


def test_file_values_override_preset_and_set_overrides_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nmodel:\n  depth: 6\nflow:\n  guidance_scale: -0.5\n")
    cfg = load_config(f, ["model.depth=2", "train.betas=[0.8, 0.9]"])
    assert cfg.model.depth == 2
    assert cfg.model.hidden_size == PRESETS["tiny"]["model"]["hidden_size"]
    assert cfg.flow.guidance_scale == -0.5
    assert cfg.train.betas == [0.8, 0.9]


def test_misspelt_key_names_closest_valid_key():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"flow": {"guidance_scal": 1.0}})
    msg = str(e.value)
    assert "flow.guidance_scal" in msg
    assert msg.index("guidance_scale") < msg.index("cfg_ratio")


def test_misspelt_section_is_refused():
    with pytest.raises(ConfigError, match="unknown key 'modle'.*model"):
        config_from_dict({"modle": {}})


@pytest.mark.parametrize("override, fragment", [
    ("flow.steps=zero", "flow.steps: expected an integer"),
    ("flow.cfg_ratio=1.5", "flow.cfg_ratio: 1.5 is out of range"),
    ("autoencoder.name=sd2", "autoencoder.name: 'sd2' is not valid"),
    ("train.use_gpu=3", "train.use_gpu: expected true/false"),
    ("model.num_heads=5", "divisible"),
    ("preset=vosr-2b", "preset"),
])
def test_bad_values_fail_with_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict({}, [override])


def test_int_widens_to_float_but_not_bool():
    assert config_from_dict({}, ["flow.guidance_scale=1"]).flow.guidance_scale == 1.0
    with pytest.raises(ConfigError):
        config_from_dict({}, ["flow.guidance_scale=true"])


def test_explain_lists_every_key_with_default():
    text = explain_config()
    cfg = config_from_dict({})
    from vosr.config.schema import flatten

    for key in flatten(cfg.to_dict()):
        assert f"  {key}: " in text, key
    assert "flow.weak_strength: float = 0.15" in text


def test_cli_misspelt_key_exits_nonzero(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stpes: 3\n")
    r = subprocess.run([sys.executable, "-m", "jobkit.cli", "config", "--config", str(f)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "train.stpes" in r.stderr and "'steps'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "jobkit.cli", "config", "--explain", "distill"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "distill.delta_t: float = 0.01" in r.stdout


def test_every_shipped_config_loads():
    from pathlib import Path

    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs").rglob("*.yaml"))
    for f in files:
        load_config(f)


def test_the_method_library_declares_no_job_setting_and_the_jobs_root_adds_their_sections(tmp_path):
    """vosr/config holds the method's sections only; the jobs' sections (CPUs per task, actor counts, GPUs per
    replica, ...) are declared beside the jobs and joined under jobkit.config.Config."""
    import dataclasses

    from jobkit.config import Config
    from vosr.config import MethodConfig
    from vosr.config import config_from_dict as method_config
    from vosr.config import load_config as load_method_config

    method = {f.name for f in dataclasses.fields(MethodConfig)}
    assert method == {"preset", "model", "autoencoder", "semantic", "flow", "distill", "degrade", "data", "inference"}
    jobs = {f.name for f in dataclasses.fields(Config)} - method
    assert jobs == {"run", "curate", "precompute", "train", "distill_job", "serve", "eval"}
    owners = {f.name: f.type for f in dataclasses.fields(Config) if f.name in jobs}
    modules = {name: type(getattr(Config(), name)).__module__ for name in owners}
    assert not [m for m in modules.values() if m.startswith("vosr")], modules

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = type(getattr(cls(), f.name))
            yield from keys(sub, f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else [prefix + f.name]

    job_like = [k for k in keys(MethodConfig) if any(w in k for w in ("cpus", "gpus", "replica", "concurrency"))]
    assert not job_like, job_like

    path = tmp_path / "job.yaml"
    path.write_text("model:\n  depth: 2\ncurate:\n  cpus_per_block: 0.5\n")
    with pytest.raises(ConfigError, match="curate"):  # the method's loader is strict about its own root
        load_method_config(path)
    assert method_config({"model": {"depth": 2}, "curate": {"x": 1}}, other_sections=True).model.depth == 2
    assert load_config(path).curate.cpus_per_block == 0.5  # the jobs' loader takes every section
    assert load_config(None, ["preset=vosr-0.5b"]).eval.crop == 512  # a preset's job keys live with the jobs
    assert load_method_config(None, ["preset=vosr-0.5b"]).data.resolution == 512
