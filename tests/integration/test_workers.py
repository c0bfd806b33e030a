"""runtime.workers and runtime.client_state_mb from the config: the run is the in-process run,
bit for bit, and client states beyond the RAM budget live on disk."""

from __future__ import annotations

import pytest
import torch

from fedfm.checkpoint import load_state
from fedfm.experiment import Experiment
from fedfm.round import run_round
from fedfm.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ['adapter.method="lora"', "adapter.rank=4", "client.max_steps=2", "model.max_length=16",
        "data.max_examples=300", "federation.clients_per_round=3",
        'compression.name="topk"', "compression.fraction=0.2", "compression.error_feedback=true"]


def test_workers_run_equals_in_process_bit_for_bit(tiny_cfg, tmp_path):
    finals = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run(tiny_cfg(*BASE, f"runtime.workers={workers}"), out)
        finals[workers] = load_state(out / "checkpoints")[0].params
    for k, v in finals[1].items():
        assert torch.equal(v, finals[2][k]), k


def test_client_states_spill_to_disk_beyond_the_budget(tiny_cfg):
    from fedfm.runtime.store import ClientStateStore

    exp = Experiment.build(tiny_cfg(*BASE, "runtime.client_state_mb=0.001", "federation.clients=6"))
    store = exp.client_states
    assert isinstance(store, ClientStateStore)
    state = exp.initial_state()
    for _ in range(2):
        state, _ = run_round(state, exp.plan)
    assert len(store) >= 3 and store.num_on_disk >= 1 and store.memory_bytes <= 1048
    exp.close()


def test_workers_refuse_other_runtimes_and_vectorize(tiny_cfg):
    from fedfm.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime.workers = 2 needs runtime.name = 'inprocess'"):
        tiny_cfg('runtime.name="flower-sim"', "runtime.workers=2")
    with pytest.raises(ConfigError, match="alternatives"):
        tiny_cfg("runtime.workers=2", "runtime.vectorize=true")


def test_streaming_rounds_agree_with_the_batch_path_and_across_runtimes(tiny_cfg, tmp_path, monkeypatch):
    """With the streaming mean forced on (these updates are small), an in-process run is the
    workers' run bit for bit (both fold in task order), and the batch path's run within float
    rounding; the bytes and the losses are the same."""
    import json

    import fedfm.round

    # every parameter travels; clients of unequal sizes, so weighting by examples matters
    sets = [*BASE, 'adapter.method="full"', "federation.rounds=2", 'partition.method="dirichlet"',
            "partition.alpha=0.3"]
    finals, metrics = {}, {}
    add, folded = fedfm.round.MeanStream.add, []

    def spy(self, result):
        folded.append(result.client_id)
        return add(self, result)

    monkeypatch.setattr(fedfm.round.MeanStream, "add", spy)
    for name, stream, workers in (("batch", False, 1), ("stream", True, 1), ("stream-workers", True, 2)):
        monkeypatch.setattr(fedfm.round, "STREAM_ABOVE", 0 if stream else 1 << 62)
        out = tmp_path / name
        folded.clear()
        run(tiny_cfg(*sets, f"runtime.workers={workers}"), out)
        assert len(folded) == (6 if stream else 0), name  # 2 rounds x 3 clients, summed as they arrived
        finals[name] = load_state(out / "checkpoints")[0].params
        metrics[name] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for k, v in finals["stream"].items():
        assert torch.equal(v, finals["stream-workers"][k]), k
        torch.testing.assert_close(v, finals["batch"][k], rtol=1e-5, atol=1e-6)
    fed = {n: [m for m in ms if m.get("phase") == "federated"] for n, ms in metrics.items()}
    assert [m["bytes_up"] for m in fed["stream"]] == [m["bytes_up"] for m in fed["batch"]]
    assert [m["train_loss"] for m in fed["stream"]] == pytest.approx([m["train_loss"] for m in fed["batch"]],
                                                                      rel=1e-5)
