"""benchmarks/gpu_check.sh, the prepared GPU run: its logic checked on a CPU (its CUDA parts cannot run here)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, *args, env=None, timeout=600):
    full = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **(env or {})}
    full.pop("FLOWDIFF_TEST_DEVICE", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True, text=True,
                          timeout=timeout)


def _uses_device_fixture(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
               and any(a.arg == "device" for a in node.args.args) for node in ast.walk(tree))


def test_the_script_lists_every_test_file_that_runs_on_the_device_fixture():
    listed = set(re.search(r"DEFAULT_TESTS=\(([^)]*)\)", SCRIPT.read_text()).group(1).split())
    using = {f"tests/{p.name}" for p in sorted((ROOT / "tests").glob("test_*.py")) if _uses_device_fixture(p)}
    assert using, "no test uses the device fixture"
    assert listed == using, (f"missing from gpu_check.sh: {sorted(using - listed)}; "
                             f"listed without device tests: {sorted(listed - using)}")


def test_unknown_options_are_refused_and_help_is_printed(tmp_path):
    bad = _run(tmp_path, "--gpu")
    assert bad.returncode == 2 and "unknown option --gpu" in bad.stderr and "--cpu" in bad.stderr
    shown = _run(tmp_path, "--help")
    assert shown.returncode == 0 and "--prepare" in shown.stdout and "$OUT" in shown.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_the_cuda_run_fails_loudly_at_the_device_step(tmp_path):
    res = _run(tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAILED: device" in summary and "CUDA is not available" in summary
    assert not (tmp_path / "out" / "pytest.log").exists()  # it stopped before the tests


def test_a_failing_test_step_fails_the_run(tmp_path):
    """pytest selecting nothing (exit 5) or failing makes the script exit 1 naming the step, after the other steps."""
    res = _run(tmp_path, "--cpu", "--no-bench", env={"GPU_CHECK_TESTS": "tests/test_syncs.py",
                                                     "GPU_CHECK_PYTEST_ARGS": "-k no_such_test"})
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAILED: tests (pytest exit 5" in summary and "gpu_check on cpu: FAILED: tests" in summary


@pytest.mark.slow
def test_cpu_quick_mode_runs_end_to_end(tmp_path):
    res = _run(tmp_path, "--cpu", "--quick")
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    assert {"device.txt", "pytest.log", "pytest.xml", "summary.txt", "throughput.md", "throughput.json"} <= {
        p.name for p in out.iterdir()}
    summary = (out / "summary.txt").read_text()
    assert re.search(r"test_ddim_equivalence: [1-9]\d* cpu variant\(s\) passed", summary)
    assert summary.rstrip().endswith("gpu_check on cpu: all passed")
    table = (out / "throughput.md").read_text()
    for loop in ("diffusers DDIM", "flowdiff euler", "diffusers DPM++ 2M", "flowdiff dpmpp_2m"):
        assert f"| digits | {loop} | 2 | 4 |" in table


def test_throughput_benchmark_compares_the_same_maps(tmp_path, monkeypatch):
    """bench_throughput's flowdiff loops compute what diffusers' loops compute (same grids, same network), so its
    images-per-second columns compare like with like; off CUDA the sync column says n/a. (4 steps divide T = 1000:
    otherwise diffusers' trailing DDIM steps to t − T//n while its next step starts elsewhere, no single grid.)"""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "benchmarks" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_throughput", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--models", "digits", "--nfe", "4", "--repeats", "1", "--batch", "2", "--json", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    rows = {r["loop"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(bench.LOOPS)
    assert rows["flowdiff euler"]["rel_diff"] < 1e-5 and rows["flowdiff dpmpp_2m"]["rel_diff"] < 1e-5
    assert all(r["images_per_s"] > 0 and r["syncs"] == "n/a" and r["nfe"] == 4 for r in rows.values())
