"""Tests for the run config: schema defaults <- YAML <- overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ddrl_scale.config import ConfigError, RunConfig, config_to_yaml, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo_cpu.yaml"

# Keys where configs/demo_cpu.yaml documents a value other than the schema default (none today:
# its header says the values equal the defaults, so `ddrl demo` and `ddrl train` run the same job).
DEMO_DOCUMENTED_DIFFERENCES: dict[str, object] = {}


def _flatten(config: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> leaf value of a (nested) dataclass config."""
    if dataclasses.is_dataclass(config):
        out: dict[str, object] = {}
        for item in dataclasses.fields(config):
            out.update(_flatten(getattr(config, item.name), f"{prefix}{item.name}."))
        return out
    return {prefix.rstrip("."): config}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_load():
    """With no file and no overrides the loader returns the schema defaults (the CPU demo)."""
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config == RunConfig()
    assert config.algo.data_beta == 0.01 and config.algo.kl_beta == 0.0 and config.algo.clip_eps == 1e-4
    assert [r.name for r in config.rewards] == ["caption_alignment", "saturation"]
    assert config.model.patch_size == [2, 2, 2]


def test_yaml_then_overrides_precedence(tmp_path):
    """Overrides beat the YAML file, the YAML file beats the defaults, a later override beats an earlier."""
    path = _write(tmp_path / "c.yaml", "optim:\n  lr: 1.0e-3\nalgo:\n  group_size: 8\n")
    config = load_config(path, ["optim.lr=2e-5", "train.steps=7", "train.steps=9"])
    assert config.optim.lr == 2e-5  # override over YAML
    assert config.algo.group_size == 8  # YAML over default
    assert config.train.steps == 9  # last override wins
    assert config.optim.weight_decay == RunConfig().optim.weight_decay  # untouched default
    assert load_config(path).optim.lr == 1e-3


def test_list_override_is_accepted():
    """A list value given as an override (model.patch_size=[2,4,4]) becomes a list of ints."""
    config = load_config(None, ["model.patch_size=[1,4,4]", "video.height=8", "video.width=8"])
    assert config.model.patch_size == [1, 4, 4]
    assert all(isinstance(p, int) for p in config.model.patch_size)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=abc", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("algo.group_size=2.5", "algo.group_size"),
        ("train.progress=maybe", "train.progress"),
        ("rewards.0.wieght=2", "wieght"),
        ("rewards=[{name: saturation, wieght: 2}]", "wieght"),
        ("optimm.lr=1", "optimm"),
    ],
)
def test_bad_override_names_key(override, key):
    """A wrongly typed or misspelt override raises ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert key in str(info.value)


def test_override_without_equals_sign():
    """An override with no '=' is a ConfigError quoting it."""
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("optim:\n  lrr: 1\n", "optim.lrr"),
        ("optimm:\n  lr: 1\n", "optimm"),
        ("optim:\n  lr: abc\n", "optim.lr"),
        ("rewards:\n  - {name: saturation, weight: 1.0}\n  - {name: caption_alignment, wieght: 2}\n",
         "wieght"),
    ],
)
def test_bad_yaml_names_key(tmp_path, text, key):
    """A misspelt or wrongly typed key inside a YAML file (also inside the reward list) names the key."""
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_missing_yaml_file(tmp_path):
    """A config path that does not exist is a ConfigError naming the path."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["algo.group_size=1"], "algo.group_size"),
        (["video.height=9"], "video.height"),
        (["model.patch_size=[2,4,4]", "video.width=10"], "video.width"),
        (["video.num_frames=5"], "video.num_frames"),
        (["optim.ema_decay=1.0"], "optim.ema_decay"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["model.hidden_size=10"], "model.hidden_size"),
        (["algo.data_beta=-1"], "algo.data_beta"),
        (["algo.policy_weight=0", "algo.data_beta=0"], "algo.policy_weight"),
        (["sampler.kind=euler"], "sampler.kind"),
        (["run.device=tpu"], "run.device"),
        (["rewards=[]"], "rewards"),
    ],
)
def test_out_of_range_names_key(overrides, key):
    """A well-typed but invalid value raises ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert f"'{key}'" in str(info.value)


def test_saved_config_reloads_equal(tmp_path):
    """config.yaml written by save_config re-loads to an equal RunConfig (lists, reward args, odd strings)."""
    config = load_config(None, [
        "model.patch_size=[2,4,4]", "video.height=8", "video.width=8", "video.num_frames=4",
        "rewards=[{name: saturation, weight: 2.5, args: {gamma: 3.0}}, {name: caption_alignment}]",
        "optim.lr=1.5e-5", "algo.kl_beta=0.1", "train.resume=none", "run.dtype=bf16",
    ])
    config.run.name = "yes"  # a YAML-1.1 boolean word must stay a string
    config.train.eval_prompts_file = "null"
    path = save_config(config, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    again = load_config(path)
    assert again == config
    assert config_to_yaml(again) == path.read_text()


def test_demo_cpu_yaml_matches_defaults():
    """configs/demo_cpu.yaml loads and equals the schema defaults except the documented differences."""
    if not DEMO_YAML.is_file():
        pytest.skip("configs/demo_cpu.yaml does not exist yet")
    demo, defaults = _flatten(load_config(DEMO_YAML)), _flatten(RunConfig())
    demo["rewards"] = [dataclasses.asdict(r) for r in demo["rewards"]]
    defaults["rewards"] = [dataclasses.asdict(r) for r in defaults["rewards"]]
    differing = {key: (defaults[key], demo[key]) for key in defaults if demo[key] != defaults[key]}
    undocumented = {key: value for key, value in differing.items()
                    if DEMO_DOCUMENTED_DIFFERENCES.get(key, object()) != value[1]}
    assert not undocumented, f"demo_cpu.yaml differs from the defaults (default, demo): {undocumented}"


def test_list_item_field_override():
    """Overriding one field of a reward in the list (rewards.0.weight=2) sets it, or is a ConfigError."""
    try:
        config = load_config(None, ["rewards.0.weight=2"])
    except ConfigError as error:  # an explicit, named refusal would also be acceptable
        assert "rewards" in str(error)
        return
    assert config.rewards[0].weight == 2.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("optim: {lr: [1\n", "bad.yaml", id="yaml-syntax-error"),
        pytest.param("- a\n- b\n", "bad.yaml", id="top-level-list"),
        pytest.param("optim: 3\n", "optim", id="section-not-a-mapping"),
    ],
)
def test_malformed_yaml_is_config_error(tmp_path, text, needle):
    """A YAML file that is not a mapping of sections raises ConfigError naming the file or key."""
    path = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)


def test_free_form_mappings_take_new_keys_and_sections_do_not():
    """A reward's args and launch.env are free-form: overrides may add keys there, nowhere else."""
    config = load_config(None, ["rewards.0.name=remote", "rewards.0.args.url=http://127.0.0.1:4000",
                                "rewards.0.args.retries=2", "launch.env.NCCL_DEBUG=INFO"])
    assert config.rewards[0].args == {"url": "http://127.0.0.1:4000", "retries": 2}
    assert config.launch.env == {"NCCL_DEBUG": "INFO"}
    for key in ("optim.bogus", "rewards.0.bogus", "rollout.bogus"):
        with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
            load_config(None, [f"{key}=1"])
