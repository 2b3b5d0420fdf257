"""The method's configuration root, `MethodConfig`: presets, YAML files and `--set` overrides for the sections the
method library reads (model, autoencoder, semantic, flow, distill, degrade, data, inference).

The jobs' sections (run, curate, precompute, train, distill_job, serve, eval) live beside their jobs; the root every
job loads, `jobkit.config.Config`, extends this one with them. The loaders here take that root as `root=`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DataConfig
from .inference import InferenceConfig
from .method import AutoencoderConfig, DegradeConfig, DistillConfig, FlowConfig, ModelConfig, SemanticConfig
from .redact import redact, secret_paths
from .schema import ConfigError, _closest, build, explain, option, parse_override, set_path, to_dict

# Presets fill the method sections; a config file and --set overrides go on top.
# Real-preset numbers: docs/method.md s4 table and paper A.3 (patch 2, MLP ratio 4, D/depth/heads).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"hidden_size": 96, "depth": 4, "num_heads": 4},
        "autoencoder": {"name": "pixel", "downsample": 4},
        "semantic": {"name": "tiny_vit", "input_size": 64, "layer": 2, "width": 64, "depth": 3,
                     "num_heads": 4, "patch_size": 8},
        "data": {"resolution": 64},
    },
    "vosr-0.5b": {
        "model": {"hidden_size": 1024, "depth": 28, "num_heads": 16},
        "autoencoder": {"name": "sd21", "downsample": 8},
        "semantic": {"name": "dinov2_vitb14", "input_size": 448, "layer": 8},
        "data": {"resolution": 512},
    },
    "vosr-1.4b": {
        "model": {"hidden_size": 1536, "depth": 36, "num_heads": 24},
        "autoencoder": {"name": "qwen2d", "downsample": 8},
        "semantic": {"name": "dinov2_vitl14", "input_size": 448, "layer": 17},
        "data": {"resolution": 512},
    },
}


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


# inference.preset: the settings the authors benchmark their released models with (docs/method.md s6-s8; their
# README: 25 steps, --cfg_scale -0.5 on RealSR and 0.5 on ScreenSR, -u 1 for ScreenSR's HR-sized LQ; the weak
# strength their sampler actually uses is mean([0.05, 0.25]) = 0.15; one step for the distilled models; AdaIN;
# --tile_size 512, whose latent tile of 64 is the training grid). Filled in under the config file and --set values.
_BENCHMARK = {
    "flow": {"steps": 25, "schedule": "linear", "weak_strength": 0.15},
    "distill": {"onestep_steps": 1},
    "autoencoder": {"inference_sample_posterior": True},
    "inference": {"color_fix": "adain", "tile_size": 512, "tile_overlap": 0, "rng": "reference",
                  "quantize": "reference", "seed": 42},
}
INFERENCE_PRESETS: dict[str, dict[str, Any]] = {
    "realsr": _merge(copy.deepcopy(_BENCHMARK), {"flow": {"guidance_scale": -0.5}, "inference": {"upscale": 4}}),
    "screensr": _merge(copy.deepcopy(_BENCHMARK), {"flow": {"guidance_scale": 0.5}, "inference": {"upscale": 1}}),
}


@dataclass
class MethodConfig:
    preset: str = option("tiny", "Preset that fills model/autoencoder/semantic/data before the file's values.",
                         choices=list(PRESETS))
    model: ModelConfig = option(ModelConfig(), "DiT backbone (docs/method.md s4).")
    autoencoder: AutoencoderConfig = option(AutoencoderConfig(), "Latent space (docs/method.md s2).")
    semantic: SemanticConfig = option(SemanticConfig(), "Semantic encoder (docs/method.md s3).")
    flow: FlowConfig = option(FlowConfig(), "Flow matching, partial conditioning, guidance, sampler "
                              "(docs/method.md s5-6).")
    distill: DistillConfig = option(DistillConfig(), "One-step distillation (docs/method.md s7).")
    degrade: DegradeConfig = option(DegradeConfig(), "Training-pair degradation (docs/method.md s1).")
    data: DataConfig = option(DataConfig(), "Crops and splits.")
    inference: InferenceConfig = option(InferenceConfig(), "Upscaling (CLI, Serve, evaluation).")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)


def config_from_dict(data: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                     root: type = MethodConfig, presets: dict[str, dict[str, Any]] | None = None,
                     other_sections: bool = False) -> Any:
    """Preset, then `data`, then `section.key=value` overrides; validated against `root` (default: the method's
    sections). `presets`: the root's presets (default PRESETS). `other_sections`: drop top-level sections `root`
    does not declare instead of failing (a checkpoint's config.json holds the jobs' sections too)."""
    presets = PRESETS if presets is None else presets
    tree: dict[str, Any] = copy.deepcopy(data or {})
    if not isinstance(tree, dict):
        raise ConfigError("a configuration file must hold a mapping at the top level")
    if other_sections:
        names = {f.name for f in dataclasses.fields(root)}
        tree = {k: v for k, v in tree.items() if k in names}
    secret = None
    for text in overrides:
        path, value = parse_override(text)
        secret = secret if secret is not None else secret_paths(root)
        if ".".join(path) in secret:
            raise ConfigError(f"{'.'.join(path)} cannot be set on the command line (argv is visible to every user "
                              "and in job manifests); put it in a config file, or for serve.api_key in the "
                              "environment variable named by serve.api_key_env or the file serve.api_key_file")
        set_path(tree, path, value)
    preset = tree.get("preset", "tiny")
    if preset not in presets:
        raise ConfigError(f"preset: {preset!r} is not valid; valid values (closest first): "
                          f"{_closest(str(preset), presets)}")
    base = copy.deepcopy(presets[preset])
    ipreset = (tree.get("inference") or {}).get("preset") if isinstance(tree.get("inference"), dict) else None
    if ipreset:
        if ipreset not in INFERENCE_PRESETS:
            raise ConfigError(f"inference.preset: {ipreset!r} is not valid; valid values (closest first): "
                              f"{_closest(str(ipreset), INFERENCE_PRESETS)}")
        base = _merge(base, INFERENCE_PRESETS[ipreset])
    merged = _merge(base, tree)
    return build(root, merged)


# A config file may extend another: a top-level `base: FILE` names the file whose mapping is read first (its own
# `base` too, recursively); this file's values then go over it, mapping by mapping (a list or scalar replaces the
# base's). FILE is relative to the folder of the file that names it (or absolute), so a chain resolves the same from
# any working directory, inside a checkout that `ray job submit --working-dir` uploaded as well. The shipped
# configs/cluster/*.yaml extend the recipes of configs/<stage>/<preset>.yaml this way.
BASE_KEY = "base"
BASE_DOC = (f"  {BASE_KEY}: str (a file's own key, read before everything else)\n"
            "      Config file this one extends: read first (recursively), then this file's values go over it, "
            "mapping by mapping; relative to the folder of the file that names it.")


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """The mapping of a YAML config file ({} for None), its `base:` chain resolved (see BASE_KEY)."""
    if not path:
        return {}
    return _read_chain(Path(path), ())


def _read_chain(p: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    import yaml

    if not p.is_file():
        named = f" (the {BASE_KEY} of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {p}{named}")
    here = p.resolve()
    if here in chain:
        raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(str(c) for c in (*chain, here))}")
    loaded = yaml.safe_load(p.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: a configuration file must hold a mapping at the top level")
    if BASE_KEY not in loaded:
        return loaded
    base = loaded.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{p}: {BASE_KEY} must be the path of a config file, not {base!r}")
    target = Path(base).expanduser()
    return _merge(_read_chain(target if target.is_absolute() else here.parent / target, (*chain, here)), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **kw: Any) -> Any:
    """Load a YAML config file (or only the preset defaults when `path` is None) plus overrides; `kw` as for
    config_from_dict (a job's root: jobkit.config.load_config)."""
    return config_from_dict(read_yaml(path), overrides, **kw)


def explain_config(section: str | None = None, *, root: type = MethodConfig,
                   presets: dict[str, dict[str, Any]] | None = None) -> str:
    """Documentation of every key with its default (tiny preset defaults shown)."""
    cfg = config_from_dict({}, root=root, presets=presets)
    if section:
        names = [f.name for f in dataclasses.fields(root)]
        if section not in names:
            raise ConfigError(f"unknown section '{section}'; valid sections (closest first): "
                              f"{_closest(section, names)}")
        f = next(f for f in dataclasses.fields(root) if f.name == section)
        tp = type(getattr(cfg, section))
        if dataclasses.is_dataclass(tp):
            return "\n".join([f"[{section}]  {f.metadata['doc']}", *explain(tp, section, getattr(cfg, section))])
        return "\n".join(explain(root, "", cfg)[:1])
    return "\n".join([BASE_DOC, *explain(root, "", cfg)])


def save_config(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(redact(cfg), sort_keys=False))
