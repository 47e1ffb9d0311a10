"""`ddrl bench`: compare on synthetic results, the suite's plumbing on stand-in scripts (failures,
plots), and the real scripts in --quick mode."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

import ddrl_scale
from ddrl_scale import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench_result(parts: dict[str, dict]) -> dict:
    """A `ddrl bench` JSON holding `parts` ({part: summary tables} or a full entry)."""
    entries = {}
    for part, content in parts.items():
        entries[part] = content if "status" in content else {"status": "ok", "summary": content}
    return {"kind": bench.BENCH_KIND, "version": 1, "parts": entries}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def cli(argv: list[str]) -> None:
    """The `ddrl bench` sub-command as the main command line wires it (add_parser + handler)."""
    parser = argparse.ArgumentParser(prog="ddrl")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


# --- compare ---------------------------------------------------------------------------------------

def test_compare_gives_b_over_a_of_the_figures_both_results_share(tmp_path: Path):
    a = bench_result({
        "step": {"engines": {"none": {"step_s": 2.0, "samples_per_s": 8.0, "mfu": 0.25},
                             "fsdp2": {"step_s": 4.0}},  # no fsdp2 row in B: skipped
                 "matmul peak": {"fp32": {"gflop_per_s": 100.0}}},
        "loader": {"readers": {"raw tar read": {"mb_per_s": 50.0}}},
        "kernels": {"status": "failed", "error": "boom"}})  # a failed part has no figures
    b = bench_result({
        "step": {"engines": {"none": {"step_s": 1.0, "samples_per_s": 16.0, "ranks": 1},  # no mfu
                             "fsdp2-cp2": {"step_s": 3.0}},
                 "matmul peak": {"fp32": {"gflop_per_s": 150.0}}},
        "loader": {"readers": {"raw tar read": {"mb_per_s": 25.0}}},
        "kernels": {"kernels": {"op": {"best_ms": 1.0}}},
        "rollout": {"e2e": {"colocated": {"step_s": 1.0}}}})  # not in A: skipped
    rows = bench.compare(write_json(tmp_path / "a.json", a), write_json(tmp_path / "b.json", b))
    found = {(r["part"], r["table"], r["row"], r["figure"]): (r["a"], r["b"], r["ratio"]) for r in rows}
    assert found == {
        ("step", "engines", "none", "step_s"): (2.0, 1.0, 0.5),
        ("step", "engines", "none", "samples_per_s"): (8.0, 16.0, 2.0),
        ("step", "matmul peak", "fp32", "gflop_per_s"): (100.0, 150.0, 1.5),
        ("loader", "readers", "raw tar read", "mb_per_s"): (50.0, 25.0, 0.5),
    }


def test_compare_of_a_zero_figure_has_no_ratio_and_booleans_are_not_figures(tmp_path: Path):
    a = bench_result({"rollout": {"e2e": {"colocated": {"publish_s": 0.0, "step_s": 1.0, "ok": True}}}})
    b = bench_result({"rollout": {"e2e": {"colocated": {"publish_s": 0.5, "step_s": 3.0, "ok": True}}}})
    rows = bench.compare(write_json(tmp_path / "a.json", a), write_json(tmp_path / "b.json", b))
    assert [(r["figure"], r["ratio"]) for r in rows] == [("publish_s", None), ("step_s", 3.0)]
    text = bench.format_compare(rows, "a.json", "b.json")
    assert "n/a (A = 0)" in text and "| 3.000 |" in text


def test_compare_rejects_missing_unreadable_and_non_bench_files(tmp_path: Path):
    good = write_json(tmp_path / "good.json", bench_result({}))
    with pytest.raises(bench.BenchError, match="missing.json does not exist"):
        bench.compare(tmp_path / "missing.json", good)
    (tmp_path / "text.json").write_text("not json {")
    with pytest.raises(bench.BenchError, match="text.json is not JSON"):
        bench.compare(good, tmp_path / "text.json")
    # a single script's results (benchmarks/bench_step.py) are not a suite result
    script = write_json(tmp_path / "step.json", {"machine": "m", "peak_flops": 1.0, "rows": []})
    with pytest.raises(bench.BenchError, match="step.json is not a `ddrl bench` result"):
        bench.compare(good, script)


def test_cli_compare_prints_the_ratios_and_exits_2_on_bad_input(tmp_path: Path, capsys):
    a = write_json(tmp_path / "a.json", bench_result({"step": {"engines": {"none": {"step_s": 2.0}}}}))
    b = write_json(tmp_path / "b.json", bench_result({"step": {"engines": {"none": {"step_s": 3.0}}}}))
    cli(["bench", "--compare", str(a), str(b)])
    assert "| step | engines | none | step_s | 2 | 3 | 1.500 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "--compare", str(a), str(tmp_path / "nope.json")])
    assert exit_info.value.code == 2
    assert "nope.json does not exist" in capsys.readouterr().err


def test_parts_and_missing_checkout_give_clear_errors(tmp_path: Path, monkeypatch):
    assert bench.parse_parts("step, loader,step") == ["step", "loader"]
    with pytest.raises(bench.BenchError, match="unknown or empty.*'gpu'.*known: loader,kernels"):
        bench.parse_parts("loader,gpu")
    monkeypatch.setattr(ddrl_scale, "__file__", str(tmp_path / "site" / "ddrl_scale" / "__init__.py"))
    with pytest.raises(bench.BenchError, match="source checkout"):
        bench.bench_dir()


# --- the suite on stand-in scripts -------------------------------------------------------------------

STAND_IN = '''
import json, os, sys
from pathlib import Path

{body}
result = {payload!r}
result["argv"] = sys.argv[1:]
folder.mkdir(parents=True, exist_ok=True)
stem = folder / "{name}"
stem.with_suffix(".json").write_text(json.dumps(result))
stem.with_suffix(".md").write_text("# stand-in report\\n")
print("written: " + str(stem) + ".json / .md")
'''
ENV_FOLDER = 'folder = Path(os.environ["DDRL_BENCH_RESULTS"])'
# like bench_kernels.py: argparse refuses options it does not know (the suite must pass only those
# --help lists)
KERNELS_BODY = '''import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--shape")
parser.add_argument("--reps")
parser.parse_args()
folder = Path(os.environ["DDRL_BENCH_RESULTS"])'''

STEP_RESULT = {"machine": "stand-in", "peak_flops": 2e11, "dtype": "fp32", "rows": [
    {"engine": engine, "ranks": ranks, "step_s": step, "rollout_s": 0.4 * step, "train_s": 0.5 * step,
     "samples_per_s": 16 / step, "achieved_flops": 1e9 / step, "mfu": 0.005 / step,
     "phases_s": {"data": 0.1 * step, "rollout": 0.4 * step, "forward": 0.2 * step,
                  "backward": 0.25 * step, "optimizer": 0.05 * step}}
    for engine, ranks, step in (("none", 1, 2.0), ("fsdp2", 2, 1.5))]}
ROLLOUT_RESULT = {"machine": "stand-in", "e2e": [
    {"setup": setup, "ranks": ranks, "time_step": step, "time_rollout": 0.5 * step, "time_train": 0.4 * step,
     "time_publish": 0.1 * step if ranks > 1 else 0.0, "time_rollout_wait": 0.45 * step,
     "samples_per_s": 16 / step, "trainer_idle_fraction": 0.5, "policy_lag": 0.0}
    for setup, ranks, step in (("colocated", 1, 2.0), ("disaggregated-lag0", 2, 1.8))]}
KERNELS_RESULT = {"machine": "stand-in", "bandwidth_bytes_per_s": {"read": 1e10, "best": 2e10}, "rows": [
    {"op": "flow_matching", "dtype": "fp32", "backend": backend, "mode": mode, "best_s": 1e-3,
     "gbps": 5.0, "bandwidth_fraction": 0.25, "speedup_vs_eager": 1.0}
    for backend in ("torch", "compile") for mode in ("forward", "both")]}


def stand_in_scripts(folder: Path, loader: str) -> Path:
    scripts = folder / "benchmarks"
    scripts.mkdir(parents=True)
    (scripts / "common.py").write_text("")
    (scripts / "bench_loader.py").write_text(loader)
    (scripts / "bench_kernels.py").write_text(STAND_IN.format(
        body=KERNELS_BODY, payload=KERNELS_RESULT, name="2000-01-01-bench_kernels-stand-in"))
    for part, payload in (("step", STEP_RESULT), ("rollout", ROLLOUT_RESULT)):
        (scripts / f"bench_{part}.py").write_text(STAND_IN.format(
            body=ENV_FOLDER, payload=payload, name=f"2000-01-01-bench_{part}-stand-in"))
    return scripts


def test_suite_reports_a_failed_part_and_still_runs_and_plots_the_others(tmp_path: Path):
    failing = 'print("reading shards ...")\nraise RuntimeError("stand-in loader failure")\n'
    scripts = stand_in_scripts(tmp_path / "checkout", failing)
    out = tmp_path / "results"
    result = bench.run_suite(["loader", "kernels", "step", "rollout"], quick=True, out_dir=out,
                             engines="none,fsdp2", scripts_dir=scripts, progress=False)
    parts = result["parts"]
    assert [parts[name]["status"] for name in bench.PART_NAMES] == ["failed", "ok", "ok", "ok"]
    error = parts["loader"]["error"]
    assert error.startswith("exit status 1") and "reading shards" in error
    assert "RuntimeError: stand-in loader failure" in error

    parts_dir = Path(result["files"]["md"]).with_name(Path(result["files"]["md"]).stem + "-parts")
    recorded = {name: json.loads((parts_dir / parts[name]["json"]).read_text())["argv"]
                for name in ("kernels", "step", "rollout")}
    assert recorded["step"] == ["--quick", "--engines", "none,fsdp2"]
    assert recorded["rollout"] == ["--quick"]
    assert recorded["kernels"] == ["--shape", "2,4,4,32,32", "--reps", "3"]  # only what --help lists
    # every part wrote into the parts folder, none beside its script
    assert not (scripts / "results").exists()
    assert (parts_dir / "2000-01-01-bench_kernels-stand-in.md").is_file()
    assert (parts_dir / "loader.log").read_text().count("stand-in loader failure") >= 1

    # the key figures, as the parts' JSON gave them
    summary = parts["step"]["summary"]
    assert summary["engines"]["fsdp2"]["step_s"] == 1.5
    assert summary["engines"]["none"]["gflop_per_s"] == pytest.approx(0.5)
    assert summary["matmul peak"]["fp32"]["gflop_per_s"] == pytest.approx(200.0)
    e2e = parts["rollout"]["summary"]
    # rollout_wait is a part of the rollout phase, not a phase of its own
    assert set(e2e["e2e phases (s)"]["colocated"]) == {"rollout", "publish"}
    assert list(parts["kernels"]["summary"]["loss kernels, forward + backward"]) == [
        "flow_matching fp32 torch", "flow_matching fp32 compile"]

    markdown = Path(result["files"]["md"]).read_text()
    assert "| loader | failed |" in markdown and "stand-in loader failure" in markdown
    assert f"]({parts_dir.name}/2000-01-01-bench_step-stand-in.md)" in markdown
    for name in ("step_breakdown", "throughput"):
        png = out / result["plots"][name]
        assert png.name.endswith(f"-{name}.png") and png.read_bytes()[:8] == PNG_MAGIC
        assert f"]({png.name})" in markdown
    # the written JSON is a bench result: compared with itself every shared figure has ratio 1
    rows = bench.compare(result["files"]["json"], result["files"]["json"])
    assert {row["part"] for row in rows} == {"kernels", "step", "rollout"}
    assert all(row["ratio"] == 1.0 for row in rows if row["a"] != 0)


def test_suite_fails_a_part_without_results_or_with_unreadable_ones(tmp_path: Path):
    silent = 'print("done, but wrote nothing")\n'
    scripts = stand_in_scripts(tmp_path / "checkout", silent)
    # rollout results without the fields the summary needs
    (scripts / "bench_rollout.py").write_text(STAND_IN.format(
        body=ENV_FOLDER, payload={"e2e": [{"time_step": 1.0}]}, name="2000-01-01-bench_rollout-bad"))
    result = bench.run_suite(["loader", "rollout"], quick=True, out_dir=tmp_path / "out",
                             scripts_dir=scripts, progress=False)
    assert result["parts"]["loader"]["status"] == "failed"
    assert result["parts"]["loader"]["error"].startswith("no `written:` line")
    assert result["parts"]["rollout"]["status"] == "failed"
    assert "could not read the figures" in result["parts"]["rollout"]["error"]
    assert "KeyError" in result["parts"]["rollout"]["error"]
    assert result["plots"] == {}  # nothing to plot


def test_cli_exits_1_when_a_part_failed_after_writing_the_report(tmp_path: Path, monkeypatch, capsys):
    scripts = stand_in_scripts(tmp_path / "checkout", 'raise SystemExit("no shards")\n')
    monkeypatch.setattr(bench, "bench_dir", lambda: scripts)
    with pytest.raises(SystemExit) as exit_info:
        cli(["bench", "--parts", "loader,step", "--quick", "--no-progress", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "failed part(s): loader" in captured.err
    assert "| step | ok |" in captured.out
    assert len(list((tmp_path / "out").glob("*-bench-quick-*.md"))) == 1


# --- the real scripts, small settings -----------------------------------------------------------------

def test_quick_loader_part_of_the_real_suite(tmp_path: Path):
    """benchmarks/bench_loader.py --quick through the suite (~10 s on 2 cores)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = bench.run_suite(["loader"], quick=True, out_dir=tmp_path, progress=False)
    entry = result["parts"]["loader"]
    assert entry["status"] == "ok", entry.get("error")
    readers = entry["summary"]["readers"]
    expected = {"raw file read", "raw tar read", "loader, 0 workers, float32", "loader, 1 workers, float32"}
    assert expected <= set(readers)
    assert all(row["samples_per_s"] > 0 for row in readers.values())
    assert 0 <= entry["summary"]["waiting for data"]["demo trainer"]["wait_fraction"] <= 1
    parts_dir = tmp_path / Path(result["files"]["md"]).name.replace(".md", "-parts")
    assert (parts_dir / entry["md"]).is_file() and (parts_dir / "loader.log").is_file()


@pytest.mark.slow
def test_quick_suite_with_loader_and_rollout_writes_the_report_and_both_plots(tmp_path: Path, capsys):
    """`ddrl bench --quick --parts loader,rollout` (~2.5 min on 2 shared cores: four torchrun jobs)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cli(["bench", "--quick", "--parts", "loader,rollout", "--no-progress", "--out", str(tmp_path)])
    [report] = tmp_path.glob("*-bench-quick-*.md")
    data = json.loads(report.with_suffix(".json").read_text())
    assert [entry["status"] for entry in data["parts"].values()] == ["ok", "ok"]
    e2e = data["parts"]["rollout"]["summary"]["colocated vs disaggregated"]
    assert set(e2e) == {"colocated", "disaggregated-lag0", "disaggregated-lag1", "disaggregated-tp2-lag0"}
    assert all(row["samples_per_s"] > 0 and row["step_s"] > 0 for row in e2e.values())
    for name in ("step_breakdown", "throughput"):
        assert (tmp_path / data["plots"][name]).read_bytes()[:8] == PNG_MAGIC
    assert "written:" in capsys.readouterr().out
