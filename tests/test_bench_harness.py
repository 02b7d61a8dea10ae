"""The benchmark harness writes what the README and the benchmark issue promise (checked on
tiny shapes; its timings mean nothing here)."""
import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_bn  # noqa: E402
import report  # noqa: E402


def test_smoke_run_writes_the_csv(tmp_path):
    assert bench_bn.main(["--smoke", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    with (tmp_path / "bn.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == bench_bn.COLUMNS
    assert rows[0]["op"] == "copy"
    seen = {(r["op"], r["layout"], r["provider"]) for r in rows[1:]}
    assert seen == {(op, layout, p) for op in bench_bn.OPS for layout in ("nchw", "nhwc")
                    for p in ("bnkernels_triton", "bnkernels_cuda", "torch", "torch_native")}
    assert all(float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 for r in rows)


def test_report_writes_the_table_and_targets(tmp_path):
    bench_bn.main(["--smoke", "--dtypes", "float32", "--out", str(tmp_path)])
    assert report.main([str(tmp_path / "bn.csv")]) == 0
    md = (tmp_path / "bn.md").read_text()
    assert "## fwd_train float32 nhwc" in md and "## Targets" in md and "geomean speedup" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bn.png").stat().st_size > 0


def test_report_puts_the_static_estimate_beside_the_measurement(tmp_path):
    bench_bn.main(["--smoke", "--dtypes", "float32", "--out", str(tmp_path)])
    rows = report.load_last_run(tmp_path / "bn.csv")
    r = next(r for r in rows if r["op"] == "fwd_train" and r["layout"] == "nhwc")
    shape = tuple(int(r[k]) for k in ("N", "C", "H", "W"))
    md = report.markdown(rows, estimates={
        "bnkernels_triton": {("fwd_train", "float32", "nhwc", *shape): 1.23},
        "bnkernels_cuda": {("fwd_train", "float32", "nhwc", *shape): 1.45}})
    assert "triton x floor: static estimate / measured" in md and "| 1.23 / " in md
    assert "cuda x floor: static estimate / measured" in md and "| 1.45 / " in md
    # the committed tables' keys are the benchmark's (pass, dtype, layout, shape)
    estimates = report.load_estimates()
    for provider in ("bnkernels_triton", "bnkernels_cuda"):
        assert ("fwd_train", "bfloat16", "nhwc", 128, 64, 112, 112) in estimates[provider]


def test_report_gives_no_three_kernel_estimate_to_a_one_launch_pass(tmp_path):
    """A Triton training row that ran as 1 launch (the persistent pass) is not what the
    static table models: its estimate is left out ("-"), the launches shown."""
    bench_bn.main(["--smoke", "--dtypes", "float32", "--layouts", "nhwc", "--ops", "fwd_train",
                   "--providers", "bnkernels_triton,torch", "--out", str(tmp_path)])
    rows = report.load_last_run(tmp_path / "bn.csv")
    mine = [r for r in rows if r["provider"] == "bnkernels_triton"]
    estimates = {"bnkernels_triton": {("fwd_train", "float32", "nhwc",
                                       *(int(r[k]) for k in ("N", "C", "H", "W"))): 1.23
                                      for r in mine}}
    assert "| 1.23 / " in report.markdown(rows, estimates=estimates)
    for r in mine:
        r["launches"] = "1"
    md = report.markdown(rows, estimates=estimates)
    assert "| 1.23 / " not in md and "| - / " in md and ", 1 launch)" in md


def test_fused_ops_smoke(tmp_path):
    ops = ",".join(bench_bn.FUSED_OPS)
    assert bench_bn.main(["--smoke", "--dtypes", "float32", "--layouts", "nhwc", "--ops", ops,
                          "--out", str(tmp_path)]) == 0
    with (tmp_path / "bn.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows[1:]} == set(bench_bn.FUSED_OPS)
    assert report.main([str(tmp_path / "bn.csv")]) == 0


def test_launch_bench_smoke(tmp_path):
    import bench_launch

    assert bench_launch.main(["--smoke", "--out", str(tmp_path)]) == 0
    with (tmp_path / "launch.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == bench_launch.COLUMNS
    seen = {(r["op"], r["provider"]) for r in rows}
    launchers = {"launch_triton", "launch_cuda"}
    assert seen == {(op, p) for op in bench_launch.OPS for p in bench_launch.PROVIDERS
                    if not (op == "train_step" and p in launchers)}
    assert all(float(r["host_us_median"]) > 0 for r in rows)


@pytest.mark.parametrize("stage", ["env_tests", "core", "extras", "sanitize", "ncu"])
def test_gpu_suite_stage_dry_run(stage, tmp_path):
    """Each stage of bench/gpu_suite.py runs its plumbing on CPU (--dry-run): its files are
    written, at most 8, no folder, with its estimate and elapsed time, and every command
    it ran exited 0 (the GPU tools are named, not run)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_suite.py"), stage,
                           "--out", str(tmp_path), "--dry-run"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files
    number = ["env_tests", "core", "extras", "sanitize", "ncu"].index(stage) + 1
    summary = (tmp_path / f"stage{number}.txt").read_text()
    assert "estimate" in summary and "elapsed" in summary
    assert "on an H100" in done.stdout and "elapsed" in done.stdout
