"""Load a run config: schema defaults <- YAML file <- `key=value` overrides, validated at once.

Errors name the key and what was expected, before any work starts (docs/architecture.md, "Config").
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddrl_scale.config.schema import ConfigError, RunConfig


def _explain(error: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    message = str(error).splitlines()[0]
    if "not in struct" in message or "Key '" in message and "not" in message:
        return ConfigError(f"{origin}: unknown config key '{key}' ({message})")
    return ConfigError(f"{origin}: config key '{key}': {message}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Return the validated `RunConfig` from an optional YAML file and dotted overrides."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as error:
            raise _explain(error, f"config file '{path}'") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, for example optim.lr=1e-5")
        key = item.split("=", 1)[0]
        if OmegaConf.select(merged, key, default="__absent__") == "__absent__":
            raise ConfigError(f"override '{item}': unknown config key '{key}'")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            raise _explain(error, f"override '{item}'") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"config keys without a value: {', '.join(missing)}")
    try:
        return OmegaConf.to_object(merged)  # runs every section's __post_init__ checks
    except OmegaConfBaseException as error:
        raise _explain(error, "config") from None


def config_to_yaml(config: RunConfig) -> str:
    """The fully expanded config, as written into every run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def save_config(config: RunConfig, run_dir: str | os.PathLike) -> Path:
    target = Path(run_dir) / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config_to_yaml(config))
    return target
