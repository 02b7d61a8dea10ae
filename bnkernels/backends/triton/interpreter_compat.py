"""Makes older Triton interpreters run the kernels under numpy >= 2.4 (CPU tensors only).

Why: the interpreter holds a kernel's scalars (a program id, a loop bound) as 1-element
numpy arrays. triton 3.6's interpreter turns one into a Python int with
`int(self.handle.data)`, which numpy 2.4 refuses for an array with a dimension ("only
0-dimensional arrays can be converted to Python scalars"): every `tl.range` over a
program's rows then fails. Newer interpreters (3.9) squeeze the array first. torch 2.11
pins triton 3.6, so a CPU user of torch 2.11 with today's numpy hits it, and so does the
GPU image (triton 3.6, numpy 2.5) wherever it runs the interpreter (the wheel test, the GPU
suite's dry runs).

The fix does what the newer interpreter does, and only where the installed one has the old
line: nothing is changed on an interpreter that already squeezes, or that is unknown.
"""
from __future__ import annotations

import inspect
from typing import Optional

_OLD_INDEX = 'scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))'
_verdict: Optional[bool] = None  # whether the fix was needed and applied; None: not read yet


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def patch_interpreter() -> bool:
    """Applies the fix once; True where the installed interpreter needed it. The verdict is
    kept: the interpreter's source is read at the first interpreted launch, not at each."""
    global _verdict
    if _verdict is None:
        _verdict = _patch()
    return _verdict


def _patch() -> bool:
    try:
        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor
        needed = _OLD_INDEX in inspect.getsource(original)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    if not needed:
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)  # restored with the rest after the call

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
