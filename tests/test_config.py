import subprocess
import sys

import pytest

from vosr.config import PRESETS, ConfigError, config_from_dict, explain_config, load_config


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

    files = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
    for f in files:
        load_config(f)
