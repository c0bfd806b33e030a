"""Every registered algorithm honours the Algorithm contract."""

from __future__ import annotations

import pytest
import torch

from fedfm.algorithms import ALGORITHMS, build_algorithm
from fedfm.config import AlgorithmConfig


def _params():
    g = torch.Generator().manual_seed(0)
    return {"layer.w": torch.randn(3, 4, generator=g), "layer.b": torch.randn(4, generator=g)}


@pytest.fixture(params=ALGORITHMS.names())
def alg(request):
    return build_algorithm(AlgorithmConfig(name=request.param))


def test_keeps_names_shapes_dtypes(alg):
    params = _params()
    state = alg.init_state(params)
    delta = {k: torch.ones_like(v) for k, v in params.items()}
    new, new_state = alg.server_update(params, state, delta)
    assert list(new) == list(params)
    assert all(new[k].shape == params[k].shape and new[k].dtype == params[k].dtype for k in params)
    assert set(new_state) == set(state)


def test_zero_delta_from_init_is_a_fixed_point(alg):
    params = _params()
    new, _ = alg.server_update(params, alg.init_state(params), {k: torch.zeros_like(v) for k, v in params.items()})
    assert all(torch.equal(new[k], params[k]) for k in params)


def test_moves_along_delta(alg):
    params = _params()
    delta = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    new, _ = alg.server_update(params, alg.init_state(params), delta)
    assert all(bool((new[k] > params[k]).all()) for k in params)


def test_pure_inputs_not_mutated_and_deterministic(alg):
    params = _params()
    state = alg.init_state(params)
    snapshot = {k: v.clone() for k, v in params.items()}
    delta = {k: torch.full_like(v, -0.2) for k, v in params.items()}
    a, _ = alg.server_update(params, state, delta)
    b, _ = alg.server_update(params, state, delta)
    assert all(torch.equal(params[k], snapshot[k]) for k in params)
    assert all(torch.equal(a[k], b[k]) for k in params)


def test_client_payload_has_no_tensors(alg):
    assert not any(isinstance(v, torch.Tensor) for v in alg.client_payload().values())


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):
        ALGORITHMS.register("fedavg")(object)
