"""Typed configuration for every VOSR job: `load_config(path, overrides)`; keys documented via `explain_config`."""

from .redact import redact, redact_text
from .root import PRESETS, Config, config_from_dict, explain_config, load_config, save_config
from .schema import ConfigError, option, to_dict

__all__ = ["PRESETS", "Config", "ConfigError", "config_from_dict", "explain_config", "load_config", "option",
           "redact", "redact_text", "save_config", "to_dict"]
