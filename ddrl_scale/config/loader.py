"""Load a run config: schema defaults <- YAML file <- `key=value` overrides, validated at once.

Errors name the key and what was expected, before any work starts (docs/architecture.md, "Config").
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddrl_scale.config.schema import ConfigError, RunConfig

_SECTIONS = {f.name for f in dataclasses.fields(RunConfig) if f.name != "rewards"}


def _explain(error: Exception, origin: str) -> ConfigError:
    key = getattr(error, "full_key", None) or getattr(error, "key", None)
    message = str(error).splitlines()[0]
    if not key:
        return ConfigError(f"{origin}: {message}")
    if "not in struct" in message or "Key '" in message and "not" in message:
        return ConfigError(f"{origin}: unknown config key '{key}' ({message})")
    return ConfigError(f"{origin}: config key '{key}': {message}")


def _load_yaml(path: Path):
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file '{path}' is not valid YAML: {error}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}': expected a mapping of sections at the top level "
                          f"(run:, model:, ...), got a {type(loaded).__name__}")
    for key, value in loaded.items():
        if key in _SECTIONS and not isinstance(value, DictConfig):
            raise ConfigError(f"config file '{path}': config key '{key}' must be a mapping of "
                              f"settings, got {value!r}")
    return loaded


def _free_key(merged, key: str) -> bool:
    """A new key inside a free-form mapping (a reward's `args`, `launch.env`) may be added."""
    parent_key, _, _ = key.rpartition(".")
    parent = OmegaConf.select(merged, parent_key, default=None) if parent_key else None
    return OmegaConf.is_dict(parent) and OmegaConf.get_type(parent) is dict


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Return the validated `RunConfig` from an optional YAML file and dotted overrides."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            merged = OmegaConf.merge(merged, _load_yaml(path))
        except (OmegaConfBaseException, TypeError) as error:
            raise _explain(error, f"config file '{path}'") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, for example optim.lr=1e-5")
        key = item.split("=", 1)[0]
        if OmegaConf.select(merged, key, default="__absent__") == "__absent__" and not _free_key(merged, key):
            raise ConfigError(f"override '{item}': unknown config key '{key}'")
        try:
            # parse the value as the dotlist syntax does, then assign it in place, so that list
            # items can be addressed too (rewards.0.weight=2)
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={item.split('=', 1)[1]}"]))
            OmegaConf.update(merged, key, value["value"], merge=True)
        except (OmegaConfBaseException, TypeError, ValueError) as error:
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
    from ddrl_scale.storage.run_files import atomic_write_text

    return atomic_write_text(Path(run_dir) / "config.yaml", config_to_yaml(config))
