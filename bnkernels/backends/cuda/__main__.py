"""python -m bnkernels.backends.cuda [--arch 90 | --emulate | --prebuilt]: build the CUDA C++
backend's library ahead of its first use (build.py)."""
import sys

from .build import main

sys.exit(main())
