# make test   — the test suite (CPU: the real Triton kernels through TRITON_INTERPRET=1)
# make bench  — the main job: the benchmark against cuDNN on a GPU; without CUDA, a
#               correctness self-check against torch that says timings need a GPU
# Both create .venv on first use. With a CUDA GPU, the venv sees the system's torch and
# triton (--system-site-packages) and installs nothing from the network.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: test bench clean

$(VENV)/.ready: setup.py requirements/cpu.txt
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
else
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
endif
	touch $@

# Two workers where pytest-xdist is installed (requirements/cpu.txt has it).
test: $(VENV)/.ready
	$(PY) -m pytest -q -p no:cacheprovider $$($(PY) -c 'import xdist' 2>/dev/null && echo '-n 2') tests

bench: $(VENV)/.ready
	$(PY) bench/main.py

clean:
	rm -rf $(VENV)
