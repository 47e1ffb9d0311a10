"""`ddrl bench`: the benchmark suite (loader, kernels, step per engine, rollout) in one report.

    ddrl bench [--parts loader,kernels,step,rollout] [--quick] [--engines none,fsdp2,...]
               [--model demo|small] [--out benchmarks/results]
    ddrl bench --compare A.json B.json

Each part is one script of benchmarks/ in the source checkout, run as a subprocess (its output goes
to a log file, a progress bar shows the parts); each writes its own JSON and markdown report into
`<out>/<stem>-parts/`, where `<stem>` is `<date>-bench-<model>-<hardware>`. From their JSON this
module keeps the key figures as tables ({table: {row: {figure: number}}}) and writes `<stem>.json`,
`<stem>.md` (machine, tables, links to the parts' reports) and two plots beside them,
`<stem>-step_breakdown.png` and `<stem>-throughput.png`. A part that fails is reported with the
tail of its log; the others still run. `--compare` prints B/A of every figure two such JSON files
share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import ddrl_scale

PART_NAMES = ("loader", "kernels", "step", "rollout")
SCRIPTS = {"loader": "bench_loader.py", "kernels": "bench_kernels.py", "step": "bench_step.py",
           "rollout": "bench_rollout.py"}
# --quick for the scripts that take it; bench_kernels.py gets small settings, each passed only when
# its --help lists the option (the script is developed on its own)
QUICK_KERNELS = {"--shape": "2,4,4,32,32", "--dtypes": "fp32", "--reps": "3", "--warmup": "1"}
RESULTS_ENV = "DDRL_BENCH_RESULTS"  # read by benchmarks/common.py
BENCH_KIND = "ddrl-bench"
WRITTEN = re.compile(r"^written: (.+)\.json / \.md\s*$")
ERROR_TAIL_LINES = 30


class BenchError(ValueError):
    """Bad input to `ddrl bench`: a missing checkout, an unknown part, a file that is not a bench JSON."""


def bench_dir() -> Path:
    """benchmarks/ of the source checkout this package was imported from."""
    folder = Path(ddrl_scale.__file__).resolve().parents[1] / "benchmarks"
    if not (folder / "common.py").is_file():
        raise BenchError(f"`ddrl bench` runs the scripts in benchmarks/ of the source checkout, and "
                         f"{folder} has none: run it from a git clone installed with `pip install -e .` "
                         f"or in the project's Docker image")
    return folder


def hardware_label() -> str:
    """A short name of the hardware for file names: the GPU model and count, else arch and cores."""
    import torch

    if torch.cuda.is_available():
        name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower()
        return f"{name}-x{torch.cuda.device_count()}"
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def machine_info() -> dict:
    import torch

    gpus = ([torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"host": platform.node(), "arch": platform.machine(), "processor": platform.processor().strip(),
            "cpu_cores": os.cpu_count(), "gpus": gpus, "torch": torch.__version__,
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": [round(value, 2) for value in os.getloadavg()]}


def parse_parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PART_NAMES]
    if unknown or not parts:
        raise BenchError(f"--parts: unknown or empty {unknown or text!r}; known: {','.join(PART_NAMES)}")
    return list(dict.fromkeys(parts))


# --- the key figures of each part's JSON, as {table: {row: {figure: number}}} ---------------------

def _pick(row: dict, fields: dict[str, str | tuple[str, float]]) -> dict[str, float]:
    """{figure: row[key] (times scale)} for the fields present and numeric in `row`."""
    picked = {}
    for figure, spec in fields.items():
        key, scale = (spec, 1.0) if isinstance(spec, str) else spec
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            picked[figure] = value * scale
    return picked


def summarize_loader(result: dict) -> dict:
    tar = result["raw"]["tar"]["mb_per_s"]
    readers = {f"raw {name} read": _pick(row, {"samples_per_s": "samples_per_s", "mb_per_s": "mb_per_s"})
               for name, row in result["raw"].items()}
    for row in result["loader"]:
        readers[f"loader, {row['workers']} workers, {row['output']}"] = {
            **_pick(row, {"samples_per_s": "samples_per_s", "mb_per_s": "mb_per_s",
                          "first_batch_s": "startup_s"}), "vs_raw_tar": row["mb_per_s"] / tar}
    waiting = {"simulated step": _pick(result["simulated_step"], {"step_s": "step_s",
                                                                  "wait_fraction": "wait_fraction"}),
               "demo trainer": _pick(result["demo_trainer"], {"step_s": "time_step_s",
                                                              "wait_fraction": "wait_fraction"})}
    return {"readers": readers, "waiting for data": waiting}


def summarize_kernels(result: dict) -> dict:
    bandwidth = {"memory": {f"{name}_gb_per_s": value / 1e9
                            for name, value in result["bandwidth_bytes_per_s"].items()}}
    # forward + backward ("both"): what a training step pays; the part's report has each pass
    rows = {f"{row['op']} {row['dtype']} {row['backend']}":
            _pick(row, {"best_ms": ("best_s", 1e3), "gb_per_s": "gbps",
                        "bandwidth_fraction": "bandwidth_fraction", "speedup_vs_eager": "speedup_vs_eager"})
            for row in result["rows"] if row["mode"] == "both"}
    return {"memory bandwidth": bandwidth, "loss kernels, forward + backward": rows}


def summarize_step(result: dict) -> dict:
    engines, phases = {}, {}
    for row in result["rows"]:
        engines[row["engine"]] = _pick(row, {"ranks": "ranks", "step_s": "step_s",
                                             "samples_per_s": "samples_per_s",
                                             "gflop_per_s": ("achieved_flops", 1e-9), "mfu": "mfu",
                                             "rollout_s": "rollout_s", "train_s": "train_s"})
        # older results have no phases: rollout, train and the rest of the step
        phases[row["engine"]] = dict(row.get("phases_s") or {
            "rollout": row["rollout_s"], "train": row["train_s"],
            "other": max(0.0, row["step_s"] - row["rollout_s"] - row["train_s"])})
    return {"engines": engines, "step phases (s)": phases,
            "matmul peak": {result.get("dtype", "fp32"): {"gflop_per_s": result["peak_flops"] / 1e9}}}


def summarize_rollout(result: dict) -> dict:
    tables = {}
    if "sampler" in result:
        tables["sampler"] = {"sde sampler": _pick(result["sampler"], {
            "videos_per_s": "videos_per_s", "denoise_steps_per_s": "denoise_steps_per_s",
            "overhead": "overhead"})}
    if "publish" in result:
        tables["weight publish"] = {row["model"]: _pick(row, {
            "parameters_m": ("parameters", 1e-6), "mb": ("bytes", 1e-6), "publish_ms": ("publish_s", 1e3),
            "gb_per_s": "gb_per_s"}) for row in result["publish"]}
    if "e2e" in result:
        tables["colocated vs disaggregated"] = {row["setup"]: _pick(row, {
            "ranks": "ranks", "step_s": "time_step", "samples_per_s": "samples_per_s",
            "rollout_s": "time_rollout", "train_s": "time_train", "publish_s": "time_publish",
            "trainer_idle_fraction": "trainer_idle_fraction", "policy_lag": "policy_lag"})
            for row in result["e2e"]}
        phases = exclusive_phases()
        tables["e2e phases (s)"] = {row["setup"]: {name: row[f"time_{name}"] for name in phases
                                                   if f"time_{name}" in row} for row in result["e2e"]}
    return tables


SUMMARIZERS: dict[str, Callable[[dict], dict]] = {
    "loader": summarize_loader, "kernels": summarize_kernels, "step": summarize_step,
    "rollout": summarize_rollout}


# --- running the parts -----------------------------------------------------------------------------

def script_options(script: Path, env: dict[str, str]) -> set[str]:
    """The --options a script's --help lists (empty when --help fails)."""
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          env=env, cwd=script.parent.parent)
    return set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout)) if done.returncode == 0 else set()


def part_arguments(part: str, script: Path, quick: bool, engines: str | None, model: str,
                   env: dict[str, str]) -> list[str]:
    if part == "kernels":
        if not quick:
            return []
        known = script_options(script, env)
        return [item for option, value in QUICK_KERNELS.items() if option in known
                for item in (option, value)]
    arguments = ["--quick"] if quick else []
    if part == "step":
        arguments += [*(["--engines", engines] if engines else []), *([] if quick else ["--model", model])]
    return arguments


def run_part(part: str, script: Path, arguments: list[str], parts_dir: Path, env: dict[str, str],
             on_line: Callable[[str], None]) -> dict:
    """Run one part's script (in the folder that holds benchmarks/), its output into
    <parts_dir>/<part>.log; returns the part's entry of the report."""
    cwd = script.parent.parent
    log = parts_dir / f"{part}.log"
    entry = {"status": "failed", "script": script.name, "arguments": arguments, "log": log.name}
    if not script.is_file():
        entry["error"] = f"{script} does not exist"
        log.write_text(entry["error"] + "\n")
        return entry
    command = [sys.executable, "-u", str(script), *arguments]
    start = datetime.datetime.now()
    written = None
    with log.open("w") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=env, cwd=cwd)
        for line in process.stdout:
            handle.write(line)
            handle.flush()
            on_line(line.rstrip())
            match = WRITTEN.match(line)
            if match:
                written = Path(match.group(1))
        returncode = process.wait()
    entry["seconds"] = (datetime.datetime.now() - start).total_seconds()
    tail = "\n".join(log.read_text().splitlines()[-ERROR_TAIL_LINES:])
    if returncode or written is None:
        entry["error"] = (f"exit status {returncode}" if returncode else "no `written:` line") + ":\n" + tail
        return entry
    try:
        result = json.loads(Path(f"{written}.json").read_text())
        for suffix in (".json", ".md"):  # results written elsewhere join the others in parts_dir
            source = Path(f"{written}{suffix}").resolve()
            if source.parent != parts_dir.resolve() and source.is_file():
                # a script that ignored DDRL_BENCH_RESULTS: its file stays where it is
                shutil.copy2(source, parts_dir / source.name)
        entry.update(json=f"{written.name}.json", md=f"{written.name}.md",
                     machine=result.get("machine"), summary=SUMMARIZERS[part](result), status="ok")
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as error:
        entry["error"] = f"could not read the figures of {written}.json: {type(error).__name__}: {error}"
    return entry


def run_suite(parts: list[str], quick: bool, out_dir: str | Path, *, engines: str | None = None,
              model: str = "demo", scripts_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run `parts` (of PART_NAMES) and write the combined report into `out_dir`; returns its JSON
    content with the paths written under "files". scripts_dir: the benchmark scripts (default: the
    checkout's benchmarks/)."""
    from tqdm import tqdm

    parts = parse_parts(",".join(parts))
    scripts = Path(scripts_dir) if scripts_dir is not None else bench_dir()
    if model not in ("demo", "small"):
        raise BenchError(f"--model: expected demo or small, got {model!r}")
    out_dir = Path(out_dir)
    stem = (f"{datetime.date.today().isoformat()}-bench-{'quick' if quick else model}-"
            f"{hardware_label()}")
    parts_dir = out_dir / f"{stem}-parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    root = scripts.resolve().parent
    env = {**os.environ, RESULTS_ENV: str(parts_dir.resolve()), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = {"kind": BENCH_KIND, "version": 1, "date": datetime.date.today().isoformat(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick,
              "model": "tiny" if quick else model, "hardware": hardware_label(), "machine": machine_info(),
              "command": command_line(parts, quick, engines, model), "parts": {}}
    bar = tqdm(parts, desc="ddrl bench", unit="part", disable=not progress, file=sys.stderr)
    shown = [0.0]

    def show(line: str) -> None:
        # the script's latest progress line beside the bar, at most every 2 s (a log file or a
        # pipe gets a line per refresh); report table rows are no progress
        now = time.monotonic()
        if line and not line.startswith("|") and now - shown[0] >= 2.0:
            shown[0] = now
            bar.set_postfix_str(line[:60], refresh=True)

    for part in bar:
        bar.set_description(f"ddrl bench: {part}")
        script = scripts / SCRIPTS[part]
        arguments = part_arguments(part, script, quick, engines, model, env) if script.is_file() else []
        entry = run_part(part, script, arguments, parts_dir, env, show)
        result["parts"][part] = entry
        bar.write(f"{part}: {entry['status']} ({entry.get('seconds', 0.0):.0f} s)", file=sys.stderr)
    bar.close()
    result["machine"]["load_average_end"] = [round(value, 2) for value in os.getloadavg()]
    files = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    files.update(write_plots(result, out_dir, stem))
    result["plots"] = {name: path.name for name, path in files.items() if name not in ("json", "md")}
    files["json"].write_text(json.dumps(result, indent=1) + "\n")
    files["md"].write_text(markdown_report(result, parts_dir.name))
    result["files"] = {name: str(path) for name, path in files.items()}
    return result


def command_line(parts: list[str], quick: bool, engines: str | None, model: str) -> str:
    return " ".join(["ddrl bench", "--parts", ",".join(parts), *(["--quick"] if quick else []),
                     *(["--engines", engines] if engines else []),
                     *(["--model", model] if model != "demo" else [])])


# --- the report --------------------------------------------------------------------------------------

def format_figure(name: str, value: float) -> str:
    if name.endswith("fraction") or name in ("mfu", "overhead"):
        return f"{value:.1%}"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e6):
        return f"{int(value)}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def markdown_table(rows: dict[str, dict[str, float]]) -> list[str]:
    columns = list(dict.fromkeys(name for row in rows.values() for name in row))
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, row in rows.items():
        lines.append(f"| {key} | " + " | ".join(format_figure(name, row[name]) if name in row else ""
                                               for name in columns) + " |")
    return lines


def markdown_report(result: dict, parts_folder: str) -> str:
    machine = result["machine"]
    gpus = ", ".join(machine["gpus"]) or "no GPU"
    lines = [f"# ddrl bench: {result['model']} model, {result['hardware']}", "",
             f"Date: {result['date']} (started {result['started']}). Command: `{result['command']}`.", "",
             f"Machine: {' '.join(filter(None, [machine['host'], machine['arch'], machine['processor']]))}, "
             f"{machine['cpu_cores']} CPU cores, {gpus}, torch {machine['torch']}, Python "
             f"{machine['python']}, OMP_NUM_THREADS={machine['omp_num_threads']}. "
             f"Load average (1, 5, 15 min) at start "
             f"{machine['load_average']}, at the end {machine.get('load_average_end')}: on a shared "
             f"machine other work runs at the same time and the figures vary between runs.", "",
             "| part | status | seconds | report | log |", "|---|---|---|---|---|"]
    for part, entry in result["parts"].items():
        report = f"[{entry['md']}]({parts_folder}/{entry['md']})" if entry.get("md") else ""
        lines.append(f"| {part} | {entry['status']} | {entry.get('seconds', 0.0):.0f} | {report} | "
                     f"[{entry['log']}]({parts_folder}/{entry['log']}) |")
    for name, title in (("step_breakdown", "Step-time breakdown"), ("throughput", "Throughput")):
        if name in result.get("plots", {}):
            lines += ["", f"![{title}]({result['plots'][name]})"]
    for part, entry in result["parts"].items():
        lines += ["", f"## {part}", ""]
        command = " ".join(["benchmarks/" + entry["script"], *entry["arguments"]])
        if entry["status"] != "ok":
            lines += [f"Failed: `{command}`", "", "```",
                      entry.get("error", ""), "```"]
            continue
        lines += [f"Script: `{command}`; its report: "
                  f"[{entry['md']}]({parts_folder}/{entry['md']}).", ""]
        for table, rows in entry["summary"].items():
            lines += [f"**{table}**", "", *markdown_table(rows), ""]
    return "\n".join(lines).rstrip() + "\n"


def exclusive_phases() -> list[str]:
    """The trainer's phase timers, in order; they and `other` add up to the step (other time_*
    metrics are parts of one of them)."""
    from ddrl_scale.telemetry.timers import PHASES

    return [*PHASES, "other"]


def _phase_order(names: set[str]) -> list[str]:
    order = [*exclusive_phases()[:-1], "train", "other"]  # "train": older step results
    return sorted(names, key=lambda name: (order.index(name) if name in order else len(order), name))


def write_plots(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """<stem>-step_breakdown.png (phases per engine and per rollout setup, stacked) and
    <stem>-throughput.png (samples/s per engine and per rollout setup), from the parts that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def table(part: str, name: str) -> dict:
        entry = result["parts"].get(part, {})
        return entry.get("summary", {}).get(name, {}) if entry.get("status") == "ok" else {}

    breakdown = [(title, rows) for title, rows in (
        ("train step per engine", table("step", "step phases (s)")),
        ("colocated vs disaggregated", table("rollout", "e2e phases (s)"))) if rows]
    sources = (("train step per engine", table("step", "engines")),
               ("colocated vs disaggregated", table("rollout", "colocated vs disaggregated")))
    throughput = [(title, {key: row["samples_per_s"] for key, row in rows.items() if "samples_per_s" in row})
                  for title, rows in sources]
    throughput = [(title, values) for title, values in throughput if values]
    files = {}
    if breakdown:
        figure, axes = plt.subplots(1, len(breakdown), figsize=(6 * len(breakdown), 4), squeeze=False)
        colors = plt.get_cmap("tab10")
        phases = _phase_order({phase for _, rows in breakdown for row in rows.values() for phase in row})
        for axis, (title, rows) in zip(axes[0], breakdown):
            bottom = [0.0] * len(rows)
            for index, phase in enumerate(phases):
                heights = [row.get(phase, 0.0) for row in rows.values()]
                axis.bar(list(rows), heights, bottom=bottom, label=phase, color=colors(index % 10))
                bottom = [low + height for low, height in zip(bottom, heights)]
            axis.set(title=title, ylabel="seconds per step")
            axis.tick_params(axis="x", labelrotation=30)
        axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        figure.suptitle(f"Step-time breakdown, {result['hardware']}, {result['date']}")
        figure.tight_layout()
        files["step_breakdown"] = out_dir / f"{stem}-step_breakdown.png"
        figure.savefig(files["step_breakdown"], dpi=100)
        plt.close(figure)
    if throughput:
        figure, axes = plt.subplots(1, len(throughput), figsize=(6 * len(throughput), 4), squeeze=False)
        for axis, (title, values) in zip(axes[0], throughput):
            axis.bar(list(values), list(values.values()), color="tab:blue")
            axis.set(title=title, ylabel="samples/s (rollout videos)")
            axis.tick_params(axis="x", labelrotation=30)
        figure.suptitle(f"Throughput, {result['hardware']}, {result['date']}")
        figure.tight_layout()
        files["throughput"] = out_dir / f"{stem}-throughput.png"
        figure.savefig(files["throughput"], dpi=100)
        plt.close(figure)
    return files


# --- compare -----------------------------------------------------------------------------------------

def load_bench_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"--compare: {path} does not exist (expected a JSON written by `ddrl bench`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BenchError(f"--compare: {path} is not JSON: {error}") from None
    if (not isinstance(data, dict) or data.get("kind") != BENCH_KIND
            or not isinstance(data.get("parts"), dict)):
        raise BenchError(f"--compare: {path} is not a `ddrl bench` result (expected \"kind\": "
                         f"\"{BENCH_KIND}\" and \"parts\"); a single script's JSON cannot be compared")
    return data


def _figures(data: dict) -> dict[tuple[str, str, str, str], float]:
    figures = {}
    for part, entry in data["parts"].items():
        if not isinstance(entry, dict) or entry.get("status") != "ok":
            continue
        for table, rows in (entry.get("summary") or {}).items():
            for row, values in rows.items():
                for name, value in values.items():
                    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                    if numeric and math.isfinite(value):
                        figures[(part, table, row, name)] = value
    return figures


def compare(a_json: str | Path, b_json: str | Path) -> list[dict]:
    """B/A of every figure present in both results (matched by part, table, row and figure name);
    `ratio` is None where A is 0."""
    a, b = _figures(load_bench_json(a_json)), _figures(load_bench_json(b_json))
    rows = []
    for key in (key for key in a if key in b):
        part, table, row, figure = key
        rows.append({"part": part, "table": table, "row": row, "figure": figure, "a": a[key], "b": b[key],
                     "ratio": b[key] / a[key] if a[key] else None})
    return rows


def format_compare(rows: list[dict], a_json: str | Path, b_json: str | Path) -> str:
    lines = [f"A: {a_json}", f"B: {b_json}", "",
             "| part | table | row | figure | A | B | B/A |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "n/a (A = 0)"
        lines.append(f"| {row['part']} | {row['table']} | {row['row']} | {row['figure']} | "
                     f"{format_figure(row['figure'], row['a'])} | {format_figure(row['figure'], row['b'])} | "
                     f"{ratio} |")
    if not rows:
        lines.append("| (no figure is present in both) | | | | | | |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> None:
    try:
        if args.compare:
            print(format_compare(compare(*args.compare), *args.compare))
            return
        out = Path(args.out) if args.out else bench_dir() / "results"
        result = run_suite(parse_parts(args.parts), args.quick, out, engines=args.engines, model=args.model,
                           progress=not args.no_progress)
    except BenchError as error:
        print(f"ddrl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(Path(result["files"]["md"]).read_text())
    print("written: " + ", ".join(result["files"].values()))
    failed = [part for part, entry in result["parts"].items() if entry["status"] != "ok"]
    if failed:
        print(f"ddrl bench: failed part(s): {', '.join(failed)} (see the report)", file=sys.stderr)
        raise SystemExit(1)


# what `ddrl bench --help` says: the user's view of the module docstring above
USAGE = """Run the benchmark suite (the anchor loader, the loss kernels, one DDRL step per engine, the
disaggregated rollouts) and write one report, or compare two reports.

Each part runs as a subprocess with its own log and report under <out>/<stem>-parts/; the suite
writes <stem>.json, <stem>.md and two plots (step breakdown, throughput), where <stem> is
<date>-bench-<model>-<hardware>. A part that fails is reported with the tail of its log and the
others still run. --compare A.json B.json prints B/A of every figure both results have."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`ddrl bench` under the main command line's subparsers."""
    parser = subparsers.add_parser("bench", help="run the benchmark suite, or compare two of its results",
                                   description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PART_NAMES),
                        help=f"comma-separated parts to run (default: all of {','.join(PART_NAMES)})")
    parser.add_argument("--quick", action="store_true", help="small settings: seconds per part (tests)")
    parser.add_argument("--engines", default=None, help="engines of the step part (bench_step.py --engines)")
    parser.add_argument("--model", default="demo", choices=["demo", "small"], help="model of the step part")
    parser.add_argument("--out", default="", help="results folder (default: benchmarks/results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="print B/A of every figure two `ddrl bench` results share, run nothing")
    parser.set_defaults(handler=cmd_bench)
    return parser
