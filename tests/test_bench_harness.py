"""The benchmark harness writes what the README and the benchmark issue promise (checked on
tiny shapes; its timings mean nothing here)."""
import csv
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_bn  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def float32_smoke_run(tmp_path_factory):
    """One `bench_bn.py --smoke --dtypes float32` run (every op, layout and provider), read
    by the tests of its CSV and of the report made from it (they share an xdist group, so
    it runs once)."""
    out = tmp_path_factory.mktemp("smoke")
    assert bench_bn.main(["--smoke", "--dtypes", "float32", "--out", str(out)]) == 0
    return out


_ON_THE_SMOKE_RUN = pytest.mark.xdist_group("float32_smoke_run")


@_ON_THE_SMOKE_RUN
def test_smoke_run_writes_the_csv(float32_smoke_run):
    with (float32_smoke_run / "bn.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == bench_bn.COLUMNS
    assert rows[0]["op"] == "copy"
    seen = {(r["op"], r["layout"], r["provider"]) for r in rows[1:]}
    assert seen == {(op, layout, p) for op in bench_bn.OPS for layout in ("nchw", "nhwc")
                    for p in ("bnkernels_triton", "bnkernels_cuda", "torch", "torch_native")}
    assert all(float(r["median_ms"]) > 0 and float(r["gbps"]) > 0 for r in rows)
    # floor_ms: the op's least traffic over the run's copy bandwidth
    copy = rows[0]
    bytes_per_ms = 2 * int(copy["N"]) * 4 / float(copy["median_ms"])
    for r in rows[1:]:
        size = 4 * int(r["N"]) * int(r["C"]) * int(r["H"]) * int(r["W"])
        want = bench_bn.LEAST_TENSORS[r["op"]] * size / bytes_per_ms
        assert float(r["floor_ms"]) == pytest.approx(want, rel=1e-3)


def test_a_run_stopped_part_way_keeps_its_rows(tmp_path, monkeypatch):
    """Rows are written as they are measured: a run interrupted (the GPU suite's stage
    deadline sends SIGINT) leaves every row it timed in bn.csv."""
    timed = []
    real_time = bench_bn._time

    def time_then_stop(fn, device):
        if len(timed) == 5:
            raise KeyboardInterrupt
        timed.append(1)
        return real_time(fn, device)

    monkeypatch.setattr(bench_bn, "_time", time_then_stop)
    with pytest.raises(KeyboardInterrupt):
        bench_bn.main(["--smoke", "--dtypes", "float32", "--layouts", "nhwc", "--ops", "fwd_eval",
                       "--out", str(tmp_path)])
    with (tmp_path / "bn.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and rows[0]["op"] == "copy"


def test_compiling_first_in_worker_processes(tmp_path, capfd):
    """--compile-jobs: the first call of every compiling provider runs in worker processes
    before the timed run (no rows from them); Inductor's graph once per (op, layout,
    dtype), first."""
    jobs = bench_bn._jobs(type("A", (), {"ops": "fwd_train,bwd", "layouts": "nchw,nhwc",
                                         "dtypes": "bfloat16"})(), [(64, 7, 7), (8, 3, 3)])
    tasks = bench_bn.warm_tasks(jobs, ["bnkernels_triton", "bnkernels_cuda", "torch",
                                       "inductor"])
    assert [p for _, p in tasks[:4]] == ["inductor"] * 4
    assert {(j[0], j[1]) for j, p in tasks if p == "inductor"} == {
        (op, layout) for op in ("fwd_train", "bwd") for layout in ("nchw", "nhwc")}
    assert {p for _, p in tasks[4:]} == {"bnkernels_triton"} and len(tasks) == 4 + len(jobs)
    assert bench_bn.main(["--smoke", "--dtypes", "float32", "--layouts", "nhwc", "--ops",
                          "fwd_train", "--providers", "bnkernels_triton,torch",
                          "--compile-jobs", "2", "--out", str(tmp_path)]) == 0
    assert "compiled in 2 processes" in capfd.readouterr().out
    with (tmp_path / "bn.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["op"] for r in rows] == ["copy"] + ["fwd_train"] * 4


@_ON_THE_SMOKE_RUN
def test_report_writes_the_table_and_targets(float32_smoke_run, tmp_path):
    shutil.copy(float32_smoke_run / "bn.csv", tmp_path / "bn.csv")  # (bn.md is written beside it)
    assert report.main([str(tmp_path / "bn.csv")]) == 0
    md = (tmp_path / "bn.md").read_text()
    assert "## fwd_train float32 nhwc" in md and "## Targets" in md and "geomean speedup" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bn.png").stat().st_size > 0


@_ON_THE_SMOKE_RUN
def test_report_puts_the_static_estimate_beside_the_measurement(float32_smoke_run):
    rows = report.load_last_run(float32_smoke_run / "bn.csv")
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


def _assert_the_launch_table(path):
    """bench_launch.py's launch.csv: every (op, provider) it measures, with host times."""
    import bench_launch
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == bench_launch.COLUMNS
    seen = {(r["op"], r["provider"]) for r in rows}
    launchers = {"launch_triton", "launch_cuda"}
    assert seen == {(op, p) for op in bench_launch.OPS for p in bench_launch.PROVIDERS
                    if not (op == "train_step" and p in launchers)}
    assert all(float(r["host_us_median"]) > 0 for r in rows)


@pytest.mark.parametrize("stages", ["1,2", "extras", "sanitize", "ncu", "models"])
def test_gpu_suite_stage_dry_run(stages, tmp_path):
    """Each stage of bench/gpu_suite.py runs its plumbing on CPU (--dry-run): its files are
    written, at most 8, no folder, with its estimate, budget and elapsed time, and every
    command it ran exited 0 with its seconds (the GPU tools are named, not run). "1,2" is
    the first GPU session's call: both stages, 8 files in one folder."""
    import subprocess
    import sys
    import gpu_suite
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / "gpu_suite.py"), stages,
                           "--out", str(tmp_path), "--dry-run"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files
    for stage in gpu_suite.parse_stages(stages):
        number = gpu_suite.STAGES.index(stage) + 1
        summary = (tmp_path / f"stage{number}.txt").read_text()
        assert "estimate" in summary and "budget" in summary and "elapsed" in summary
        assert "budget ran out" not in summary and "budget spent" not in summary
        ran = [line for line in summary.splitlines() if line.startswith("rc ")]
        assert ran and all(re.match(r"rc 0 after \d+ s: ", line) for line in ran), summary
    assert "on an H100" in done.stdout and "elapsed" in done.stdout
    if stages == "extras":  # its bench_launch.py --smoke: the launch bench's own smoke test
        _assert_the_launch_table(tmp_path / "launch.csv")


def test_gpu_suite_stops_a_command_at_its_stage_deadline(tmp_path, monkeypatch):
    """A command still running when its stage's budget runs out is interrupted (SIGINT,
    then SIGKILL), exits 124, and the stage still writes its summary; a command after it
    is not started."""
    import time
    import gpu_suite
    # Not a Python child: one that SIGINT reaches while it is still starting can swallow the
    # KeyboardInterrupt (raised in a class body that a .pth file's import runs, it becomes a
    # RuntimeError that site.py reports and passes over; 3 in 300 interrupts at random
    # start-up moments here) and sleep on until the SIGKILL. The suite's commands are long
    # past start-up at their deadlines, and the SIGKILL covers them anyway.
    sleeper = ["sh", "-c", "echo started; exec sleep 120"]
    log = tmp_path / "log.txt"
    # with this process ignoring SIGINT, as a shell's background job without job control
    # starts it (the commands would inherit that; found when CI was started so)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time.monotonic()
        with log.open("w") as f:
            assert gpu_suite._run_until(sleeper, None, f, start + 2) == 124
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # (the caller's, restored)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 2 + gpu_suite.STOP_GRACE_S
    assert "started" in log.read_text()

    def two_sleepers(stage, out, dry, extra):
        return [(sleeper, "log.txt", False), (sleeper, "log.txt", False)]

    monkeypatch.setattr(gpu_suite, "commands", two_sleepers)
    assert gpu_suite.run_stage("core", tmp_path, False, [], budget_s=2) == 124
    summary = (tmp_path / "stage2.txt").read_text()
    assert "budget ran out" in summary and "not run (budget spent)" in summary
    assert "elapsed" in summary


def test_gpu_suite_stopped_takes_its_command_with_it(tmp_path):
    """SIGTERM to the suite (the device call's own limit) ends the command it is running,
    with the processes that command started: nothing keeps the GPU busy afterwards."""
    import os
    import signal
    import subprocess
    import time
    bench = Path(__file__).resolve().parents[1] / "bench"
    pids = tmp_path / "pids"
    script = f"""
import os, subprocess, sys
sys.path.insert(0, {str(bench)!r})
import gpu_suite
child = [sys.executable, "-c", "import os, subprocess, sys, time; "
         "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
         "open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{kid.pid}}'); time.sleep(120)"]
gpu_suite.commands = lambda stage, out, dry, extra: [(child, "log.txt", False)]
sys.exit(gpu_suite.main(["core", "--out", {str(tmp_path)!r}, "--budget-s", "100"]))
"""
    suite = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and suite.poll() is None
        time.sleep(0.1)
    suite.send_signal(signal.SIGTERM)
    assert suite.wait(timeout=30) == 128 + signal.SIGTERM
    summary = (tmp_path / "stage2.txt").read_text()  # still written: what was running
    assert "running: " in summary and "elapsed" in summary

    def running(pid):  # (a zombie waiting for its reaper has ended)
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    for pid in map(int, pids.read_text().split()):
        for _ in range(50):
            if not running(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} outlived the suite")


def test_gpu_suite_shares_the_budget_by_the_estimates():
    import gpu_suite
    assert gpu_suite.parse_stages("1,core") == ["env_tests", "core"]
    with pytest.raises(SystemExit):
        gpu_suite.parse_stages("7")
    # one stage: its estimate x 1.25, within one device call's limit
    assert gpu_suite.default_budget_s(["env_tests"]) == 6 * 60 * 1.25
    assert gpu_suite.default_budget_s(["env_tests", "core"]) == gpu_suite.BUDGET_CAP_S
