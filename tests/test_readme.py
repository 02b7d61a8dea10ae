"""The README's quick start runs as written (on this CPU: the default backend, no
interpreter), in a fresh process; setup.py's floors are releases the README shows tested."""
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


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("."))


def test_install_floors_are_the_oldest_releases_tested():
    """setup.py asks for no release older than the README's table of runs shows passing:
    its Python, torch and triton floors are the table's oldest."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The releases it has run on"):]
    section = section[:section.index("\n#")]
    rows = re.findall(r"^\| (3\.\d+)\.\d+ \| (\d+\.\d+)\.\d+\S* \| (\d+\.\d+)\.\d+ \|", section,
                      re.M)
    assert len(rows) >= 2, "the README's table of runs is missing"
    setup = (ROOT / "setup.py").read_text()
    floors = (re.search(r'python_requires=">=(\d+\.\d+)"', setup).group(1),
              re.search(r'"torch>=(\d+\.\d+)"', setup).group(1),
              re.search(r'"triton>=(\d+\.\d+)', setup).group(1))
    for name, floor, tested in zip(("Python", "torch", "triton"), floors, zip(*rows)):
        assert floor == min(tested, key=_version), f"{name}: setup.py asks for >= {floor}"
