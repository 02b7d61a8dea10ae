"""BNKERNELS_BACKEND: auto | triton | cuda | torch, and the plain-torch path agreeing with
Triton (the cuda backend's own tests: test_cuda_backend.py)."""
import pytest
import torch

import bnkernels
from bnkernels import backends
from helpers import launches, make_input, random_params


def _run(x, training=True, activation=None, residual=None):
    w, b, rm, rv = random_params(x.shape[1], torch.float32, x.device)
    x, w = x.detach().requires_grad_(True), w.requires_grad_(True)
    leaves = [x, w]
    if residual is not None:
        residual = residual.detach().requires_grad_(True)
        leaves.append(residual)
    y = bnkernels.batch_norm(x, rm, rv, w, b, training=training, activation=activation,
                             residual=residual)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y).cumsum(0))
    return y, *grads, rm, rv


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("gelu", True),
                                                      ("relu", False), ("relu", True),
                                                      (None, True)])
def test_torch_backend_agrees_with_triton(training, activation, with_residual, device,
                                          monkeypatch):
    x = make_input((3, 5, 6, 7), torch.float32, device, "channels_last", loc=1.0)
    r = make_input((3, 5, 6, 7), torch.float32, device, seed=5) if with_residual else None
    with_triton = _run(x, training, activation, r)
    monkeypatch.setenv("BNKERNELS_BACKEND", "torch")
    before = sum(launches("triton").values())
    with_torch = _run(x, training, activation, r)
    assert sum(launches("triton").values()) == before  # no Triton kernel on the torch path
    for a, b in zip(with_triton, with_torch):  # dweight: sums of terms up to |b|.max()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("BNKERNELS_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select(x).name == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.select(x).name == "torch"


def test_forced_triton_without_a_way_to_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors, or TRITON_INTERPRET=1"):
        bnkernels.batch_norm(torch.randn(2, 3), None, None, training=True)


def test_bad_backend_value(monkeypatch):
    monkeypatch.setenv("BNKERNELS_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="BNKERNELS_BACKEND='cudnn' is not one of auto, "
                                         "triton, cuda, torch"):
        bnkernels.batch_norm(torch.randn(2, 3), None, None, training=True)


def _old_patch_lang_tensor(tensor, scope):
    """triton 3.6's interpreter, as far as the fix reads it: the line below is its own."""
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def test_an_old_interpreter_indexes_its_scalars_under_new_numpy(monkeypatch):
    """triton 3.6's interpreter turns a (1,)-shaped scalar into an int with int(array),
    which numpy 2.4 refuses; interpreter_compat makes it squeeze first, as 3.9's does."""
    np = pytest.importorskip("numpy")
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    from bnkernels.backends.triton import interpreter_compat
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    monkeypatch.setattr(interpreter_compat, "_verdict", None)
    assert interpreter_compat.patch_interpreter()
    assert interpreter._patch_lang_tensor is not _old_patch_lang_tensor

    class Handle:
        data = np.array([7], dtype=np.int32)  # how the interpreter holds a scalar

    class Tensor:
        handle = Handle()

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Tensor, scope)
    assert range(Tensor())[-1] == 6  # range() calls __index__
    scope.restore()
    assert not hasattr(Tensor, "__index__")  # the interpreter's restore undoes it too


def test_an_interpreter_that_squeezes_is_left_alone(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    from bnkernels.backends.triton import interpreter_compat

    def squeezing(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", squeezing)
    monkeypatch.setattr(interpreter_compat, "_verdict", None)
    assert not interpreter_compat.patch_interpreter()
    assert interpreter._patch_lang_tensor is squeezing

    def unread(*args):
        raise AssertionError("the interpreter's source is read again")

    monkeypatch.setattr(interpreter_compat.inspect, "getsource", unread)
    assert not interpreter_compat.patch_interpreter()  # every later launch: the kept verdict
