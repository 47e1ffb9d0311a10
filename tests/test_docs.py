"""The README's config reference and the demo YAML stay true to the schema."""

import dataclasses
import re
from pathlib import Path

from ddrl_scale.config import load_config
from ddrl_scale.config.schema import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def schema_keys() -> set[str]:
    keys = set()
    for section in dataclasses.fields(RunConfig):
        if section.name == "rewards":
            keys.add("rewards")
            continue
        for field in dataclasses.fields(section.default_factory()):
            keys.add(f"{section.name}.{field.name}")
    return keys


def readme_keys() -> set[str]:
    text = (ROOT / "README.md").read_text()
    reference = text.split("## Config reference", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in reference.splitlines():
        if row.startswith("| `"):
            keys.update(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", row.split("|")[1]))
    return keys


def test_readme_config_reference_lists_every_key_and_no_other():
    """Every schema key has a README row, and every README row names a schema key."""
    assert schema_keys() - readme_keys() == set(), "keys missing from the README reference"
    assert readme_keys() - schema_keys() == set(), "README names keys the schema lacks"


def test_demo_yaml_equals_embedded_defaults():
    """configs/demo_cpu.yaml spells out the schema defaults: `ddrl demo` == `ddrl train` on it."""
    assert load_config(ROOT / "configs" / "demo_cpu.yaml") == load_config(None)


def test_readme_defaults_match_schema():
    """The default column of the README agrees with the schema for scalar keys."""
    defaults = load_config(None)
    text = (ROOT / "README.md").read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    for row in text.splitlines():
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`") or "," in cells[0]:
            continue
        key, shown = cells[0].strip("`"), cells[1].strip("`")
        if key == "rewards" or not shown or " " in shown:
            continue
        section, name = key.split(".")
        value = getattr(getattr(defaults, section), name)
        if isinstance(value, bool):
            assert shown == str(value).lower(), key
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(shown) == float(value), key
        elif isinstance(value, str):
            assert shown in (value, f'"{value}"', '""' if value == "" else value), key
