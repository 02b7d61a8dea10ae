"""Bad input: the same error type and wording as torch, raised before anything changes."""
import pytest
import torch

import bnkernels
from helpers import bn_pair, kernels_only


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _assert_same_error(torch_call, ours_call):
    with pytest.raises(Exception) as theirs:
        torch_call()
    with pytest.raises(type(theirs.value)) as ours:
        ours_call()
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("dim,bad_shape", [(2, (4, 3, 2, 2)), (4, (4, 3, 5)), (4, (3,)),
                                           (5, (2, 3, 4, 4))])
def test_wrong_number_of_dims(dim, bad_shape, device):
    ref, ours = bn_pair(dim, 3, torch.float32, device)
    x = torch.randn(bad_shape, device=device)
    before = _state(ours)
    _assert_same_error(lambda: ref(x), lambda: ours(x))
    assert all(torch.equal(v, _state(ours)[k]) for k, v in before.items())


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_changes_nothing(training, device):
    ref, ours = bn_pair(4, 3, torch.float32, device)
    ref.train(training), ours.train(training)
    x = torch.randn(2, 4, 5, 5, device=device)
    before = _state(ours)
    _assert_same_error(lambda: ref(x), lambda: ours(x))
    after = _state(ours)
    # torch itself has already counted the batch in num_batches_tracked here; we have not.
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_one_value_per_channel_in_training(device):
    ref, ours = bn_pair(4, 3, torch.float32, device)
    x = torch.randn(1, 3, 1, 1, device=device)
    before = _state(ours)
    _assert_same_error(lambda: ref(x), lambda: ours(x))
    assert all(torch.equal(v, _state(ours)[k]) for k, v in before.items())


@pytest.mark.parametrize("case", ["running_mean_only", "eval_without_stats", "weight_size",
                                  "bias_size", "running_var_size", "integer_input",
                                  "eps_zero_training", "eps_negative", "one_value"])
def test_functional_errors_like_torch(case, device):
    x = torch.randn(2, 3, 4, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    kwargs = dict(input=x, running_mean=rm, running_var=rv, training=True)
    if case == "running_mean_only":
        kwargs.update(running_var=None)
    elif case == "eval_without_stats":
        kwargs.update(running_mean=None, running_var=None, training=False)
    elif case == "weight_size":
        kwargs.update(weight=torch.ones(4, device=device))
    elif case == "bias_size":
        kwargs.update(bias=torch.ones(2, device=device))
    elif case == "running_var_size":
        kwargs.update(running_var=torch.ones(5, device=device))
    elif case == "integer_input":
        kwargs.update(input=torch.ones(2, 3, 4, dtype=torch.int64, device=device))
    elif case == "eps_zero_training":
        kwargs.update(eps=0.0)
    elif case == "eps_negative":
        kwargs.update(eps=-1.0, training=False)
    elif case == "one_value":
        kwargs.update(input=torch.randn(1, 3, device=device))
    before = (rm.clone(), rv.clone())
    if case == "integer_input":  # torch's wording differs by device; the type is the contract
        with pytest.raises(NotImplementedError):
            torch.nn.functional.batch_norm(**kwargs)
        with pytest.raises(NotImplementedError):
            bnkernels.batch_norm(**kwargs)
    else:
        _assert_same_error(lambda: torch.nn.functional.batch_norm(**kwargs),
                           lambda: bnkernels.batch_norm(**kwargs))
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("eps", [0.0, -1.0, -1e-30, 0])
def test_eps_at_or_below_zero_is_refused_exactly_where_torch_refuses_it(eps, training, device):
    """torch's rule moved between releases (2.11 refuses any eps <= 0; 2.13 takes eps = 0
    in eval): bnkernels follows the torch it runs beside, its verdict and its words."""
    x = torch.randn(2, 3, 4, device=device)
    stats = lambda: (torch.zeros(3, device=device), torch.ones(3, device=device))  # noqa: E731
    try:
        expected = torch.nn.functional.batch_norm(x, *stats(), training=training, eps=eps)
    except Exception:  # noqa: BLE001 - torch refuses it: so must we, in its words
        rm, rv = stats()
        _assert_same_error(
            lambda: torch.nn.functional.batch_norm(x, *stats(), training=training, eps=eps),
            lambda: bnkernels.batch_norm(x, rm, rv, training=training, eps=eps))
        assert torch.equal(rm, stats()[0]) and torch.equal(rv, stats()[1])
        return
    with kernels_only():
        got = bnkernels.batch_norm(x, *stats(), training=training, eps=eps)
    torch.testing.assert_close(got, expected)


def test_the_eps_rule_is_read_off_torch(monkeypatch):
    """_eps_refusals() under a batch_norm with torch 2.11's rule (any eps <= 0 refused,
    one wording): bnkernels then refuses all four cases, in those words."""
    from bnkernels import functional

    def batch_norm_2_11(input, running_mean, running_var, weight=None, bias=None,
                        training=False, momentum=0.1, eps=1e-5):
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive, but got {eps}")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm_2_11)
    refusals = functional._eps_refusals()
    assert refusals == {key: (ValueError, "batch_norm eps must be positive, but got ", True)
                        for key in ((False, False), (False, True), (True, False), (True, True))}
    monkeypatch.setattr(functional, "_EPS_REFUSALS", refusals)
    with pytest.raises(ValueError, match=r"^batch_norm eps must be positive, but got 0\.0$"):
        bnkernels.batch_norm(torch.randn(2, 3), torch.zeros(3), torch.ones(3), eps=0.0)


def test_momentum_none_in_functional_is_a_type_error(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(TypeError):
        bnkernels.batch_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device),
                             training=True, momentum=None)


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_eval_with_one_running_statistic(missing, device):
    x = torch.randn(2, 3, 4, device=device)
    stats = {"running_mean": torch.zeros(3, device=device),
             "running_var": torch.ones(3, device=device), missing: None}
    _assert_same_error(lambda: torch.nn.functional.batch_norm(x, training=False, **stats),
                       lambda: bnkernels.batch_norm(x, training=False, **stats))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
def test_unsupported_input_dtype_wording(dtype, device):
    x = torch.ones(2, 3, 4, dtype=dtype, device=device)
    for training in (True, False):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        if device == "cpu":  # (torch's CUDA wording names its kernel: the type is the contract)
            _assert_same_error(lambda: torch.nn.functional.batch_norm(x, rm, rv, training=training),
                               lambda: bnkernels.batch_norm(x, rm, rv, training=training))
        with pytest.raises(NotImplementedError, match="'[A-Z][A-Za-z]+'"):  # 'Long', 'Bool'
            bnkernels.batch_norm(x, rm, rv, training=training)
        assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))


@pytest.mark.parametrize("momentum", ["0.1", [0.1], torch.tensor([0.1]), object(),
                                      torch.tensor(0.1, requires_grad=True)])
def test_momentum_that_is_not_a_number(momentum, device):
    """torch's TypeError, raised before anything is written: by the functional form and by
    a module (whose num_batches_tracked does not move)."""
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    _assert_same_error(
        lambda: torch.nn.functional.batch_norm(x, rm, rv, training=True, momentum=momentum),
        lambda: bnkernels.batch_norm(x, rm, rv, training=True, momentum=momentum))
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))
    ref, ours = bn_pair(3, 3, torch.float32, device)
    ref.momentum = ours.momentum = momentum
    before = _state(ours)
    with pytest.raises(TypeError):
        ref(x)
    with pytest.raises(TypeError):
        ours(x)
    assert all(torch.equal(v, _state(ours)[k]) for k, v in before.items())


@pytest.mark.parametrize("number", [0.25, 1, True, torch.tensor(0.25), torch.tensor(1)])
def test_momentum_as_any_number(number, device):
    x = torch.randn(4, 3, 5, device=device)
    results = []
    for fn in (torch.nn.functional.batch_norm, bnkernels.batch_norm):
        rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
        fn(x, rm, rv, training=True, momentum=number)
        results.append((rm, rv))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("case", ["float64_stats", "float64_weight", "float16_weight",
                                  "float16_input_float64_stats", "stats_require_grad",
                                  "stats_shaped_1c11", "weight_float64_stats_float32"])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_dtype_and_shape_errors_like_torch(case, training, device):
    x = torch.randn(4, 3, 5, device=device)
    args = {"running_mean": torch.zeros(3, device=device),
            "running_var": torch.ones(3, device=device),
            "weight": torch.rand(3, device=device) + 0.5, "bias": torch.randn(3, device=device)}
    if case == "float64_stats":
        args.update(running_mean=args["running_mean"].double(),
                    running_var=args["running_var"].double())
    elif case == "float64_weight":
        args.update(weight=args["weight"].double())
    elif case == "float16_weight":
        args.update(weight=args["weight"].half())
    elif case == "float16_input_float64_stats":
        x = x.half()
        args.update(running_mean=args["running_mean"].double())
    elif case == "stats_require_grad":
        args["running_mean"].requires_grad_(True)
    elif case == "stats_shaped_1c11":
        args.update(running_mean=args["running_mean"].reshape(1, 3, 1, 1),
                    running_var=args["running_var"].reshape(1, 3, 1, 1))
    elif case == "weight_float64_stats_float32":
        x = x.half()
        args.update(weight=args["weight"].double())
    before = {k: v.detach().clone() for k, v in args.items()}
    _assert_same_error(lambda: torch.nn.functional.batch_norm(x, training=training, **args),
                       lambda: bnkernels.batch_norm(x, training=training, **args))
    assert all(torch.equal(args[k].detach(), v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_16_bit_input_with_float32_parameters_is_accepted(dtype, training, device):
    """What torch on CUDA (and on CPU) accepts, as AMP produces it: 16-bit input, float32
    weight, bias and running statistics; the output in the input's dtype."""
    x = (torch.randn(4, 3, 5, device=device) + 0.5).to(dtype)
    results = []
    for fn in (torch.nn.functional.batch_norm, bnkernels.batch_norm):
        rm, rv = torch.zeros(3, device=device) + 0.1, torch.ones(3, device=device)
        w, b = torch.full((3,), 1.5, device=device), torch.full((3,), -0.5, device=device)
        y = fn(x, rm, rv, w, b, training=training)
        results.append((y, rm, rv))
    assert results[1][0].dtype == dtype
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2)
