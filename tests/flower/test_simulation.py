"""The same experiment on Flower's simulation engine (Ray) gives the in-process model, bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from fedfm.checkpoint import load_state  # noqa: E402
from fedfm.runner import run  # noqa: E402

pytestmark = pytest.mark.slow


def test_flower_simulation_equals_inprocess_bitwise(tmp_path, tiny_cfg):
    cfg = tiny_cfg('adapter.method="lora"', "adapter.dropout=0.1", 'compression.name="quantize"')
    run(cfg, tmp_path / "local")
    sim = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"name": "flower-sim"})})
    summary = run(sim, tmp_path / "sim")
    a, _ = load_state(tmp_path / "local" / "checkpoints")
    b, _ = load_state(tmp_path / "sim" / "checkpoints")
    assert a.round == b.round == 2
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert summary["rounds"] == 2
