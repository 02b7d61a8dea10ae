# make test   — the test suite (CPU: the real Triton kernels through TRITON_INTERPRET=1)
# make bench  — the main job: the benchmark against cuDNN on a GPU; without CUDA, a
#               correctness self-check against torch that says timings need a GPU
# Both create .venv on first use (CPU: requirements/cpu.txt); on a GPU machine that already
# has torch and triton they use its interpreter and install nothing.
PYTHON ?= python3
VENV   ?= .venv
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# A GPU machine whose interpreter already has torch and triton (the device image) is used as
# it is: a venv made from it would not see its packages, and it has no network to fetch them.
HAS_STACK := $(shell $(PYTHON) -c "import torch, triton" >/dev/null 2>&1 && echo 1)

ifeq ($(HAS_GPU)$(HAS_STACK),11)
PY    := PYTHONPATH=$(CURDIR) $(PYTHON)
READY :=
else
PY    := $(VENV)/bin/python
READY := $(VENV)/.ready
endif

.PHONY: test bench clean

$(VENV)/.ready: setup.py requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements/cpu.txt
	# csrc/ is not prebuilt here: the tests compile it themselves (per arch, and for the
	# CPU emulation of the CUDA C++ backend).
	BNKERNELS_BUILD_CUDA=0 $(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Two workers where pytest-xdist is installed (requirements/cpu.txt has it); loadgroup keeps
# the tests that share one expensive fixture (xdist_group: the wheel build) on one worker.
test: $(READY)
	$(PY) -m pytest -q -p no:cacheprovider $$($(PY) -c 'import xdist' 2>/dev/null && echo '-n 2 --dist loadgroup') tests

bench: $(READY)
	$(PY) bench/main.py

clean:
	rm -rf $(VENV)
