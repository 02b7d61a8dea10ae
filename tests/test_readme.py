"""The README's quick start runs as written (on this CPU: the default backend, no
interpreter), in a fresh process."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import models  # noqa: E402


def _quick_start() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(models.import_torchvision() is None, reason="torchvision is not installed")
def test_quick_start_runs_as_written():
    # A torchvision whose C extension does not load beside this torch needs bench/models.py's
    # fix before the snippet's own import; nothing else is added to it.
    code = f"import sys; sys.path.insert(0, {str(BENCH)!r}); import models; " \
           "models.import_torchvision()\n" + _quick_start()
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "BNKERNELS_BACKEND", "BNKERNELS_CUDA_EMULATE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
