"""Bad input: the same error type and wording as torch, raised before anything changes."""
import pytest
import torch

import bnkernels
from helpers import bn_pair


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


def test_momentum_none_in_functional_is_a_type_error(device):
    x = torch.randn(2, 3, device=device)
    with pytest.raises(TypeError):
        bnkernels.batch_norm(x, torch.zeros(3, device=device), torch.ones(3, device=device),
                             training=True, momentum=None)
