"""Two pieces of work that triton's interpreter (3.6 to 3.9) does and then throws away,
skipped under the test suite (conftest.py applies both under TRITON_INTERPRET=1). Together
they took about half of the suite's time in the interpreter; the kernels run the same
operations on the same values without them (test_test_setup.py checks, bitwise).

- The overflow check of every integer add, sub and mul: the interpreter builds the int64
  result and its range test with its own ops, then hands the test to device_assert, which
  drops it: the interpreter's options have debug off. The check is skipped only where
  device_assert would drop it; with debug on, it runs as before.
- Patching triton.language again at every call of a @triton.jit helper inside a kernel: the
  launch has already patched the same modules, and a helper's patch is never undone (it sets
  equal replacements over the launch's, which the launch's own restore then removes). It is
  skipped only where the helper sees no module that the launch, or a helper before it in
  the same launch, has not patched (triton.language's own helpers, tl.sum and tl.zeros, see
  triton.language.core, which a kernel's module does not name).

Each applies only where the installed interpreter's source shows what it relies on.
"""
import inspect
import types


def skip_dropped_overflow_checks() -> bool:
    """True where the interpreter's overflow check now runs only with debug on."""
    try:
        from triton.language.semantic import TritonSemantic
        from triton.runtime import interpreter
        drops = ("if not self.builder.options.debug:"
                 in inspect.getsource(TritonSemantic.device_assert))
        checking = TritonSemantic.binary_op_sanitize_overflow_impl
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    semantic = getattr(interpreter, "interpreter_semantic", None)
    if not drops or not isinstance(semantic, TritonSemantic):
        return False

    def overflow_check(self, lhs, rhs, binary_op):
        if not self.builder.options.debug:  # device_assert would drop what it computes
            return None
        return checking(self, lhs, rhs, binary_op)

    # on the interpreter's instance only: the GPU compiler's semantics are untouched
    semantic.binary_op_sanitize_overflow_impl = types.MethodType(overflow_check, semantic)
    return True


class _NothingPatched:
    """The scope of a helper's patch that was skipped: nothing to restore."""

    def restore(self) -> None:
        pass


def patch_the_language_once_per_launch() -> bool:
    """True where a helper's call inside a launch no longer patches triton.language."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        helper_call = inspect.getsource(interpreter.InterpretedFunction.__call__)
        launch_call = inspect.getsource(interpreter.GridExecutor.__call__)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    if "_patch_lang(self.fn)" not in helper_call or "patch_scope.restore()" not in launch_call:
        return False
    if getattr(interpreter._patch_lang, "once_per_launch", False):
        return True
    patch_lang = interpreter._patch_lang
    launch = interpreter.GridExecutor.__call__
    patched = None  # the modules patched in the launch in progress; None outside one

    def languages(fn) -> frozenset:  # what _patch_lang patches for fn, as it finds them
        return frozenset(id(v) for v in fn.__globals__.values()
                         if inspect.ismodule(v) and (v is tl or v is tl.core))

    def patch_once(fn):
        nonlocal patched
        seen = languages(fn)
        # (a helper that sees no triton.language at all still fails as it did)
        if seen and patched is not None and seen <= patched:
            return _NothingPatched()
        scope = patch_once.__wrapped__(fn)
        if patched is not None:  # the launch's own patch, or a helper's that saw more
            patched |= seen
        return scope

    def launch_patching_once(self, *args, **kwargs):
        nonlocal patched
        outer, patched = patched, frozenset()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched = outer

    patch_once.once_per_launch = True
    patch_once.__wrapped__ = patch_lang
    launch_patching_once.__wrapped__ = launch
    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch_patching_once
    return True
