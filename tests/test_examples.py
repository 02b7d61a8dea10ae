"""examples/paper_experiments.py --quick runs end to end and writes what it promises."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_paper_experiments_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    # The default backend: plain torch on CPU (the interpreter would take minutes), Triton on CUDA.
    env = dict(os.environ, BNKERNELS_BACKEND="auto", TRITON_INTERPRET="0",
               PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "examples" / "paper_experiments.py"), "--quick",
                    "--out", str(tmp_path)], check=True, env=env, timeout=600)
    result = json.loads((tmp_path / "results.json").read_text())
    for name in ("fig1_mlp.png", "learning_rate.png", "cnn.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert set(result["summary"]) == {"mlp", "cnn"}
    for kind, summary in result["summary"].items():
        assert [(c["bn"], c["lr_mult"]) for c in summary["configs"]] == \
            [(False, 1), (True, 1), (True, 5), (True, 30), (False, 5)]
    mlp = [r for r in result["runs"] if r["model"] == "mlp" and r["lr_mult"] == 1]
    assert all(len(r["percentiles"]) == len(r["steps"]) for r in mlp)
    with_bn = next(r for r in mlp if r["bn"])
    without = next(r for r in mlp if not r["bn"])
    assert with_bn["test_acc"][-1] > without["test_acc"][-1]
