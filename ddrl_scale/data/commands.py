"""`ddrl data prepare | validate | stats`: argument parsing and printing for the data tools.

Place in the data flow (docs/architecture.md): the command-line face of `prepare.py` and
`validate.py`; `cli.py` adds these subcommands with `add_data_commands(data_subparsers)`. Importing
this module is cheap (argparse only); each command imports its work when it runs.

Exit codes: 0 done; 1 `validate` found problems; 2 bad input (a message names it, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_data_commands(data_commands: argparse._SubParsersAction) -> None:
    """Add prepare, validate and stats to the `ddrl data` subparsers."""
    prepare = data_commands.add_parser(
        "prepare", help="mp4 files or video2dataset tars -> latent shards + index (parallel, resumable)")
    prepare.add_argument("input", help="folder of videos with .txt/.json captions, or tar shards "
                                       "(folder, glob, brace pattern, pipe:/http URLs)")
    prepare.add_argument("--out", required=True, help="output folder (shards, index.json)")
    # pixels; through the VAE they must give the run's video.* latent shape (README, "Post-train on
    # your own videos"); the defaults with --vae pixel give the demo's 3x8x16x16
    prepare.add_argument("--num-frames", type=int, default=8,
                         help="frames taken from each video (every --frame-stride-th from the first); "
                              "the VAE makes video.num_frames latent frames of them: pixel and patch:P "
                              "as many, Wan's 1 + (F - 1) / 4 (default: %(default)s)")
    prepare.add_argument("--height", type=int, default=16,
                         help="pixel height after scale-to-cover and centre crop; height / the VAE's "
                              "spatial factor (pixel 1, patch:P P, Wan 8) must be video.height "
                              "(default: %(default)s)")
    prepare.add_argument("--width", type=int, default=16,
                         help="pixel width, likewise: width / the VAE's spatial factor must be "
                              "video.width (default: %(default)s)")
    prepare.add_argument("--frame-stride", type=int, default=1, help="take every k-th frame")
    prepare.add_argument("--vae", default="pixel", help="pixel | patch:<P> | diffusers:<folder>")
    prepare.add_argument("--text-encoder", default="none",
                         help="none | hash | hash:<dim>:<max_tokens> | diffusers:[<max_tokens>:]<folder> "
                              "(a diffusers pipeline's text_encoder/ + tokenizer/, e.g. Wan2.1's UMT5)")
    prepare.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    prepare.add_argument("--format", dest="latent_format", default="safetensors",
                         choices=["safetensors", "npy"])
    prepare.add_argument("--samples-per-shard", type=int, default=256, help="videos per output shard "
                         "(folder input; each input tar makes one shard)")
    prepare.add_argument("--batch-size", type=int, default=8, help="videos per VAE call")
    prepare.add_argument("--device", default="cpu", help="device of the VAE, for example cuda")
    prepare.add_argument("--workers", type=int, default=1, help="processes in this task")
    prepare.add_argument("--task-index", type=int, default=None,
                         help="this task among --num-tasks (default: SLURM_ARRAY_TASK_ID, else 0)")
    prepare.add_argument("--num-tasks", type=int, default=None,
                         help="tasks of the job (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    prepare.add_argument("--overwrite", action="store_true",
                         help="delete what an earlier prepare wrote in --out first")
    prepare.add_argument("--no-verify-existing", dest="verify_existing", action="store_false",
                         help="trust finished shards' sizes without recomputing their SHA-256")
    prepare.set_defaults(handler=cmd_prepare)

    validate = data_commands.add_parser("validate", help="check prepared shards against their index")
    validate.add_argument("root", help="prepared folder, or its index.json (path or URL)")
    validate.add_argument("--workers", type=int, default=1, help="processes (one shard each at a time)")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    validate.set_defaults(handler=cmd_validate)

    stats = data_commands.add_parser("stats", help="counts, shapes and latent statistics of prepared shards")
    stats.add_argument("root", help="prepared folder, or its index.json (path or URL)")
    stats.add_argument("--scan", action="store_true", help="read every sample: latent mean/std per "
                                                          "channel, caption lengths")
    stats.add_argument("--json", action="store_true", help="print as JSON")
    stats.set_defaults(handler=cmd_stats)


def _fail(error: Exception) -> None:
    print(f"ddrl: error: {error}", file=sys.stderr)
    raise SystemExit(2)


def cmd_prepare(args: argparse.Namespace) -> None:
    from ddrl_scale.data.latent_shards import ShardFormatError
    from ddrl_scale.data.prepare import PrepareError, PrepareSettings, prepare
    from ddrl_scale.runtime import setup

    setup()
    try:
        settings = PrepareSettings(args.num_frames, args.height, args.width, args.frame_stride, args.vae,
                                   args.text_encoder, args.dtype, args.latent_format,
                                   args.samples_per_shard, args.batch_size, args.device)
        summary = prepare(args.input, args.out, settings, args.workers, args.task_index, args.num_tasks,
                          args.overwrite, args.verify_existing)
    except (PrepareError, ShardFormatError, FileNotFoundError, ValueError) as error:
        _fail(error)
    for line in prepare_report(summary):
        print(line)
    if summary.index_totals is not None and summary.index_totals["num_samples"] == 0:
        _fail(ValueError(f"prepare: no input of '{args.input}' gave a sample "
                         f"({summary.index_totals['num_skipped']} skipped; the reasons are above)"))


MAX_LISTED_SKIPPED = 20  # the summary names this many skipped inputs; the sidecars list them all


def prepare_report(summary) -> list[str]:
    """The lines `ddrl data prepare` prints: this run's work, each skipped input once, and the
    index's totals (the same on a rerun that had nothing left to do)."""
    head = f"task: {summary.units_in_task} of {summary.units_total} units"
    lines = [f"{head}, all already done (nothing written)" if not summary.units_written else
             f"{head} ({summary.units_already_done} already done, {summary.units_written} written now: "
             f"{summary.samples_written} samples, {summary.inputs_skipped} inputs skipped) in "
             f"{summary.seconds:.1f} s"]
    lines += [f"  skipped {entry['source']}: {entry['reason']}"
              for entry in summary.skipped[:MAX_LISTED_SKIPPED]]
    if len(summary.skipped) > MAX_LISTED_SKIPPED:
        lines.append(f"  ... and {len(summary.skipped) - MAX_LISTED_SKIPPED} more (every skipped input "
                     "is listed in index/part-*.json, 'skipped')")
    if summary.index_totals is None:
        lines.append("index: not written yet (other tasks' units are not all done)")
    else:
        totals = summary.index_totals
        lines.append(f"index: {summary.index_path}: {totals['num_samples']} samples in "
                     f"{totals['num_shards']} shards, {totals['num_skipped']} inputs skipped in the index")
    return lines


def cmd_validate(args: argparse.Namespace) -> None:
    from ddrl_scale.data.latent_shards import ShardFormatError
    from ddrl_scale.data.validate import validate

    try:
        report = validate(args.root, args.workers)
    except (ShardFormatError, FileNotFoundError) as error:
        _fail(error)
    if args.json:
        print(json.dumps({"index": report.index_url, "num_shards": report.num_shards,
                          "num_samples": report.num_samples, "samples_ok": report.samples_ok,
                          "problems": [vars(problem) for problem in report.problems]}, indent=1))
    else:
        print(report.summary())
    if not report.ok:
        raise SystemExit(1)


def cmd_stats(args: argparse.Namespace) -> None:
    from ddrl_scale.data.latent_shards import ShardFormatError
    from ddrl_scale.data.validate import stats

    try:
        result = stats(args.root, args.scan)
    except (ShardFormatError, FileNotFoundError) as error:
        _fail(error)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for key, value in result.items():
        print(f"{key}: {value}")
