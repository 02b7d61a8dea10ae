"""The install ships what the README promises: `pip wheel .` gives a wheel that, installed
into a fresh venv on a machine without nvcc, imports, runs the Triton kernels, carries
csrc/, says how to build the CUDA backend, and builds it from the shipped sources once a
compiler is there (here: the CPU emulation build, which needs g++ and the CUDA headers)."""
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from bnkernels.backends.cuda import build as cuda_build

# One worker builds the wheel once for all three tests (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("wheel")
ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "bnkernels", "csrc", "docs")


def _run(argv, **kwargs):
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A venv holding only the wheel; torch and the rest are seen through a .pth line (no
    .pth of theirs runs, so the checkout's editable install stays out of it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    tree = tmp / "src"  # a copy: the in-tree build would leave build/ in the checkout
    tree.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns(
                "__pycache__", "_lib", "*.egg-info"))
        else:
            shutil.copy2(source, tree / name)
    env = {"PATH": "/usr/bin:/bin", "BNKERNELS_BUILD_CUDA": "0", "HOME": str(tmp)}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", str(tmp / "dist"), str(tree)], env=env)
    wheel = next((tmp / "dist").glob("bnkernels-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .strip())
    (site / "_checkout_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
          str(site), str(wheel)], env=env)
    return python, tmp


def _wheel_env(tmp, **env):
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "BNKERNELS_CACHE_DIR": str(tmp / "cache"),
            "BNKERNELS_NVCC": str(tmp / "no-nvcc"), **env}  # no nvcc, wherever the toolkit is


def _python(fresh_venv, code, **env):
    python, tmp = fresh_venv
    return _run([str(python), "-c", textwrap.dedent(code)], env=_wheel_env(tmp, **env), cwd=tmp)


def test_the_wheel_installs_and_runs_the_triton_kernels(fresh_venv):
    out = _python(fresh_venv, """
        import torch, bnkernels
        from bnkernels import backends
        assert "/venv/" in bnkernels.__file__, bnkernels.__file__  # the wheel, not the checkout
        x = torch.randn(4, 3, 5, 5)
        y = bnkernels.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        ref = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        torch.testing.assert_close(y, ref)
        print(backends.get("triton").launch_counts()["apply"])
    """, TRITON_INTERPRET="1", BNKERNELS_BACKEND="triton")
    assert out.strip() == "1"


def test_the_wheel_ships_csrc_and_says_how_to_build_without_nvcc(fresh_venv):
    out = _python(fresh_venv, """
        from bnkernels.backends.cuda import build
        assert build.CSRC == build.SHIPPED_CSRC and build.source_digest(), build.CSRC
        print(sorted(p.name for p in build.sources()))
        try:
            build.build_cached("90")
        except build.BuildError as error:
            print(error)
    """)
    shipped, message = out.strip().split("\n", 1)
    assert shipped == str(sorted(p.name for p in cuda_build.sources()))
    assert "nvcc not found" in message
    assert "python -m bnkernels.backends.cuda --arch" in message


@pytest.mark.skipif(cuda_build.cuda_include_dir() is None, reason="no CUDA headers")
def test_the_wheel_builds_the_cuda_backend_from_its_own_sources(fresh_venv):
    """The build command (`python -m bnkernels.backends.cuda --emulate`) compiles the shipped
    sources into the cache, prints where, and warns of nothing; the kernels then run on it."""
    python, tmp = fresh_venv
    include = cuda_build.cuda_include_dir()
    done = subprocess.run([str(python), "-m", "bnkernels.backends.cuda", "--emulate"],
                          capture_output=True, text=True, cwd=tmp,
                          env=_wheel_env(tmp, CUDA_HOME=str(include.parent)))
    assert done.returncode == 0, done.stderr
    assert not done.stderr  # (no runpy warning: the entry point is the package's __main__)
    built = Path(done.stdout.strip())
    assert built.is_file() and built.is_relative_to(tmp / "cache"), built
    assert (built.parent / "build.log").read_text() == ""  # -Wall -Wextra: no warning
    out = _python(fresh_venv, """
        import torch, bnkernels
        from bnkernels import backends
        from bnkernels.backends.cuda import library
        x = torch.randn(4, 3, 5, 5)
        y = bnkernels.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        ref = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)
        torch.testing.assert_close(y, ref)
        print(sum(backends.get("cuda").launch_counts().values()))
        print(library.library_path(torch.device("cpu"), build=False))
    """, BNKERNELS_BACKEND="cuda", BNKERNELS_CUDA_EMULATE="1", CUDA_HOME=str(include.parent))
    launches, loaded = out.split()
    assert int(launches) >= 1 and loaded == str(built)
