"""The Flower runtime's logic on an in-memory Grid: the real ServerApp loop and the real ClientApp
functions, with message delivery faked (no processes). The loopback tests in this folder do the
same over real SuperLink/SuperNode processes."""

from __future__ import annotations

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from fedfm.checkpoint import load_client_states, load_state  # noqa: E402
from fedfm.config import to_toml  # noqa: E402
from fedfm.errors import FedfmError  # noqa: E402
from fedfm.runner import run  # noqa: E402
from fedfm.runtime.flower import codec  # noqa: E402
from fedfm.runtime.flower.client_app import app as client_app  # noqa: E402
from fedfm.runtime.flower.grid_runtime import GridRuntime  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the running task's identity; a real SuperLink sets it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


class MemoryGrid:
    """Delivers each message to the ClientApp of its node, in this process.

    ``partitions`` maps node id -> partition id; nodes in ``silent`` never answer (a killed node).
    Each node keeps one persistent ``context.state``, as a real SuperNode does across rounds.
    """

    def __init__(self, partitions: dict[int, int], run_config: dict, silent=()):
        self.partitions, self.run_config, self.silent = dict(partitions), run_config, set(silent)
        self.trained: list[int] = []
        self.states = {node: RecordDict() for node in self.partitions}

    def get_node_ids(self):
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.silent:
                continue
            ctx = Context(run_id=1, node_id=node, node_config={codec.PARTITION_ID: self.partitions[node]},
                          state=self.states[node], run_config=self.run_config)
            if m.metadata.message_type == codec.TRAIN:
                self.trained.append(self.partitions[node])
            replies.append(client_app(m, ctx))
        return replies


def _grid(cfg, out, **kw):
    rc = {codec.RUN_CONFIG: to_toml(cfg), codec.RUN_OUT: str(out)}
    return MemoryGrid({100 + c: c for c in range(cfg.federation.clients)}, rc, **kw)


@pytest.mark.parametrize("pipeline", [
    (),
    # local DP noise and stochastic rounding drawn on the clients, top-k residuals kept in context.state
    ('privacy.mechanism="local"', "privacy.noise_multiplier=0.05", "privacy.clip=0.5",
     'compression.name=["topk", "quantize"]', "compression.fraction=0.1", "federation.rounds=3"),
], ids=["plain", "local-dp+topk-ef+quantize"])
def test_grid_runtime_equals_inprocess_bitwise(tmp_path, tiny_cfg, pipeline):
    cfg = tiny_cfg('adapter.method="lora"', "adapter.dropout=0.1", *pipeline)
    run(cfg, tmp_path / "inprocess")
    grid = _grid(cfg, tmp_path / "flower")
    run(cfg, tmp_path / "flower", runtime=GridRuntime(grid, round_timeout=5, min_clients=2))
    a, meta = load_state(tmp_path / "inprocess" / "checkpoints")
    b, _ = load_state(tmp_path / "flower" / "checkpoints")
    assert a.round == b.round and list(a.params) == list(b.params) and a.extra == b.extra
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert len(grid.trained) == cfg.federation.rounds * cfg.federation.clients_per_round
    assert a.round == cfg.federation.rounds
    # the residuals the in-process runtime checkpointed are the ones the SuperNodes keep
    kept = load_client_states(tmp_path / "inprocess" / "checkpoints", meta)
    on_nodes = {c: codec.load_client_state(grid.states[100 + c]) for c in range(cfg.federation.clients)}
    assert {c for c, s in on_nodes.items() if s} == set(kept) and (bool(kept) == bool(pipeline))
    for c, residual in kept.items():
        assert list(residual) == list(on_nodes[c]) and all(torch.equal(residual[k], on_nodes[c][k]) for k in residual)


def test_silent_node_is_left_out_and_the_round_goes_on(tmp_path, tiny_cfg):
    cfg = tiny_cfg("federation.clients_per_round=4", "federation.rounds=1")
    grid = _grid(cfg, tmp_path, silent={102})
    runtime = GridRuntime(grid, round_timeout=1, min_clients=2)
    run(cfg, tmp_path / "run", runtime=runtime)
    import json

    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert [r["client"] for r in line["rejected"]] == [2]
    assert "no reply" in line["rejected"][0]["reason"] or "partition 2" in line["rejected"][0]["reason"]
    assert sorted(grid.trained) == [0, 1, 3]


def test_too_few_nodes_fails_clearly_within_the_timeout(tmp_path, tiny_cfg):
    cfg = tiny_cfg()
    grid = MemoryGrid({100: 0}, {codec.RUN_CONFIG: to_toml(cfg), codec.RUN_OUT: str(tmp_path)})
    runtime = GridRuntime(grid, round_timeout=0.3, min_clients=2, poll_s=0.1)
    with pytest.raises(FedfmError, match="only 1 SuperNode.*min_clients=2"):
        run(cfg, tmp_path / "run", runtime=runtime)


def test_task_reaching_the_wrong_partition_is_refused(tiny_cfg):
    from fedfm.types import ClientTask

    cfg = tiny_cfg()
    grid = MemoryGrid({100: 0}, {codec.RUN_CONFIG: to_toml(cfg), codec.RUN_OUT: "unused"})
    task = ClientTask(round=1, client_id=3, params={"w": torch.zeros(2)}, seed=1)
    from flwr.app import Message

    reply, = grid.send_and_receive([Message(codec.encode_task(task), dst_node_id=100, message_type=codec.TRAIN)])
    wr = codec.decode_result(reply.content)
    assert wr.up is None and "partition 3" in wr.error and "holding partition 0" in wr.error


def test_codec_roundtrip_keeps_bytes_and_payload():
    from fedfm import wire
    from fedfm.types import ClientTask

    params = {"a.weight": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float32)}
    task = ClientTask(round=4, client_id=2, params=params, seed=99, payload={"mu": 0.01})
    back, nbytes = codec.decode_task(codec.encode_task(task))
    assert nbytes == len(wire.encode(params))
    assert (back.round, back.client_id, back.seed, dict(back.payload)) == (4, 2, 99, {"mu": 0.01})
    assert list(back.params) == list(params) and all(torch.equal(back.params[k], params[k]) for k in params)
    up = wire.encode({"a.weight": torch.ones(3, 4)})
    wr = codec.decode_result(codec.encode_result(2, up, {"train_loss": 0.5, "num_examples": 7}, nbytes))
    assert wr.up == up and wr.metrics == {"train_loss": 0.5, "num_examples": 7.0} and wr.bytes_down == nbytes


def test_restarted_serverapp_resumes_from_its_checkpoint(tmp_path, tiny_cfg):
    """A ServerApp killed after round 1 and started again continues to the same model."""
    from fedfm.runner import Callbacks
    from fedfm.runtime.flower.server_app import serve

    cfg = tiny_cfg("federation.rounds=3", 'adapter.method="lora"', "adapter.dropout=0.1")
    run(cfg, tmp_path / "whole")
    out = tmp_path / "flower"
    grid = _grid(cfg, out)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=grid.run_config)

    class Crash(Exception):
        pass

    def crash_after_round_1(line):
        if line["round"] == 1:
            raise Crash

    with pytest.raises(Crash):
        serve(grid, ctx, Callbacks(on_round_end=crash_after_round_1))
    assert load_state(out / "checkpoints")[0].round == 1
    serve(grid, ctx)  # the restarted ServerApp finds the run directory and resumes
    a, _ = load_state(tmp_path / "whole" / "checkpoints")
    b, _ = load_state(out / "checkpoints")
    assert a.round == b.round == 3 and all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_app_written_by_another_fedfm_version_is_refused_clearly(tmp_path, tiny_cfg):
    from flwr.app import Message

    from fedfm.runtime.flower.server_app import serve
    from fedfm.types import ClientTask

    cfg = tiny_cfg()
    grid = _grid(cfg, tmp_path / "run")
    grid.run_config[codec.RUN_VERSION] = "0.0.1"
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=grid.run_config)
    with pytest.raises(FedfmError, match="written by fedfm 0.0.1, but this machine runs fedfm"):
        serve(grid, ctx)
    task = ClientTask(round=1, client_id=0, params={"w": torch.zeros(2)}, seed=1)
    reply, = grid.send_and_receive([Message(codec.encode_task(task), dst_node_id=100, message_type=codec.TRAIN)])
    assert "written by fedfm 0.0.1" in codec.decode_result(reply.content).error


def test_importing_fedfm_does_not_import_flower():
    import subprocess
    import sys

    code = "import fedfm, fedfm.runner, fedfm.experiment, sys; assert 'flwr' not in sys.modules, 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
