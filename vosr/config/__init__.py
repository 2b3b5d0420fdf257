"""The method's typed configuration: `load_config(path, overrides)` -> MethodConfig (model, autoencoder, semantic,
flow, distill, degrade, data, inference); keys documented via `explain_config`. The jobs load the whole root,
jobkit.config.Config, which adds the jobs' sections to this one."""

from .redact import redact, redact_text
from .root import PRESETS, MethodConfig, config_from_dict, explain_config, load_config, read_yaml, save_config
from .schema import ConfigError, option, to_dict

__all__ = ["PRESETS", "ConfigError", "MethodConfig", "config_from_dict", "explain_config", "load_config", "option",
           "read_yaml", "redact", "redact_text", "save_config", "to_dict"]
