"""The README's "Post-train on your own videos", followed verbatim (issue 24 item 4).

The commands are read from the README's marked blocks (`<!-- own-videos: small set -->` and
`large set`, each followed by a ```sh block) and run as written through `ddrl_scale.cli.main`, in
a folder holding mp4 files this test makes (and `configs/`, linked); `ddrl train` gets only
`train.steps=1 train.eval_prompts=0 kernels.backend=torch` and an output folder added, as the
README says. The three size flags' help text in the README is compared with the parser's.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ddrl_scale import cli
from ddrl_scale.data import latent_shards as fmt
from ddrl_scale.data.video_io import write_video

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Post-train on your own videos"
TRAIN_EXTRA = ["train.steps=1", "train.eval_prompts=0", "kernels.backend=torch", "train.progress=false"]


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    assert SECTION in text, f"the README has no section {SECTION!r}"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def marked_commands(mark: str) -> list[str]:
    """The lines of the ```sh block right after `<!-- own-videos: MARK -->`."""
    match = re.search(rf"<!-- own-videos: {re.escape(mark)} -->\n```sh\n(.*?)\n```", readme_section(), re.S)
    assert match, f"no marked ```sh block '{mark}' in the README section"
    return [line for line in match.group(1).splitlines() if line.strip()]


def _clips(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # 12 frames of 24 x 32: prepare takes the first 8 and scales / crops them to 16 x 16
    return [np.repeat(rng.integers(0, 256, (12, 6, 8, 3), dtype=np.uint8), 4, axis=1).repeat(4, axis=2)
            for _ in range(count)]


def make_video_folder(folder: Path, count: int) -> None:
    folder.mkdir()
    for index, frames in enumerate(_clips(count, 0)):
        write_video(folder / f"clip{index}.mp4", frames)
        (folder / f"clip{index}.txt").write_text(f"a red square moving right, take {index}")


def make_video2dataset_tars(folder: Path, per_tar: int, tars: int) -> None:
    folder.mkdir()
    scratch = folder.parent / "scratch.mp4"
    for tar_index in range(tars):
        with tarfile.open(folder / f"{tar_index:05d}.tar", "w") as tar:
            for index, frames in enumerate(_clips(per_tar, tar_index + 1)):
                key = f"{tar_index:05d}{index:04d}"
                fmt.add_sample(tar, key, {"mp4": write_video(scratch, frames).read_bytes(),
                                          "txt": f"clip {key}".encode(),
                                          "json": json.dumps({"url": f"http://example/{key}"}).encode()})
    scratch.unlink()


def run_readme_commands(lines: list[str], workdir: Path, monkeypatch, capsys) -> dict[str, str]:
    """Each README line through the real CLI, in `workdir`; its stdout by command."""
    monkeypatch.chdir(workdir)
    monkeypatch.delenv("RANK", raising=False)
    (workdir / "configs").symlink_to(ROOT / "configs")
    outputs = {}
    for line in lines:
        argv = shlex.split(line)
        assert argv[0] == "ddrl", line
        if argv[1] == "train":
            argv += [*TRAIN_EXTRA, f"run.output_dir={workdir / 'run'}"]
        code = cli.main(argv[1:])
        captured = capsys.readouterr()
        assert code == 0, f"`{line}` exited {code}:\n{captured.out}\n{captured.err}"
        outputs[" ".join(argv[1:3])] = captured.out
    return outputs


def check_trained(run: Path) -> None:
    """One DDRL step on the prepared samples: finite loss, a data term, no sample skipped."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1]
    assert math.isfinite(records[0]["loss"]) and records[0]["data_loss"] > 0
    assert records[0]["anchor_samples_skipped"] == 0


def test_readme_small_set_commands_run_as_written(tmp_path, monkeypatch, capsys):
    lines = marked_commands("small set")
    assert [shlex.split(line)[1:3] for line in lines] == [["data", "prepare"], ["data", "validate"],
                                                         ["train", "configs/demo_cpu.yaml"]]
    make_video_folder(tmp_path / "my_videos", 5)
    outputs = run_readme_commands(lines, tmp_path, monkeypatch, capsys)
    assert "5 samples in 1 shards, 0 inputs skipped in the index" in outputs["data prepare"]
    assert "5/5 samples ok, 0 problems" in outputs["data validate"]
    check_trained(tmp_path / "run")


@pytest.mark.slow
def test_readme_large_set_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """video2dataset tars, two prepare workers, data.split=sharded with loader workers (~40 s)."""
    lines = marked_commands("large set")
    assert "data.split=sharded" in lines[-1]
    make_video2dataset_tars(tmp_path / "my_tars", per_tar=3, tars=2)
    outputs = run_readme_commands(lines, tmp_path, monkeypatch, capsys)
    assert "6 samples in 2 shards, 0 inputs skipped in the index" in outputs["data prepare"]
    assert "6/6 samples ok, 0 problems" in outputs["data validate"]
    check_trained(tmp_path / "run")


def test_readme_flag_help_is_the_parsers(monkeypatch):
    """The README quotes `ddrl data prepare --help` for the three size flags, defaults included."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal width
    def subcommands(parser: argparse.ArgumentParser) -> dict:
        return next(action for action in parser._actions
                    if isinstance(action, argparse._SubParsersAction)).choices

    prepare = subcommands(subcommands(cli.build_parser())["data"])["prepare"]
    help_text = prepare.format_help()
    quoted = help_text[help_text.index("  --num-frames"):help_text.index("  --frame-stride")].rstrip("\n")
    match = re.search(r"<!-- own-videos: flags[^\n]*-->\n\n(.*?)\n\n", readme_section(), re.S)
    assert match, "no marked flags block in the README section"
    readme = "\n".join(line[4:] for line in match.group(1).splitlines())  # an indented code block
    assert readme == quoted
    for flag, default in (("--num-frames", 8), ("--height", 16), ("--width", 16)):
        assert prepare.get_default(flag.lstrip("-").replace("-", "_")) == default
        assert re.search(rf"{flag} [A-Z_]+\s.*?\(default:\s+{default}\)", readme, re.S)


def test_a_single_process_sharded_run_saves_its_checkpoint(tmp_path, tiny_overrides):
    """The large-set path on one process: saving gathers the loader state without a process group
    (the object-collective device check once demanded one)."""
    from ddrl_scale.config import load_config
    from ddrl_scale.data.prepare import PrepareSettings, prepare
    from ddrl_scale.train.trainer import Trainer

    make_video_folder(tmp_path / "videos", 4)
    prepare(str(tmp_path / "videos"), tmp_path / "shards", PrepareSettings(num_frames=4, height=8, width=8))
    trainer = Trainer(load_config(None, [*tiny_overrides, f"data.shards={tmp_path / 'shards'}",
                                         "data.split=sharded"]))
    path = trainer.save()
    assert (path / "trainer_state.pt").is_file()
    trainer.loader.close()
