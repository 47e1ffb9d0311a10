"""Run configuration: typed schema (`schema`) and loading with overrides (`loader`)."""

from ddrl_scale.config.loader import config_to_yaml, load_config, save_config
from ddrl_scale.config.schema import ConfigError, RunConfig

__all__ = ["ConfigError", "RunConfig", "config_to_yaml", "load_config", "save_config"]
