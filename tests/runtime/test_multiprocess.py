"""MultiProcessRuntime: forked workers give the in-process runtime's results, bit for bit, and
survive their workers dying."""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import signal
import time

import psutil
import pytest
import torch
from conftest import TINY

from fedfm.config import load_config
from fedfm.round import run_round
from fedfm.runtime.inprocess import InProcessRuntime
from fedfm.runtime.multiprocess import MultiProcessRuntime
from fedfm.runtime.store import ClientStateStore
from fedfm.types import ClientTask

LORA = ['adapter.method="lora"', "adapter.dropout=0.1", "federation.clients_per_round=4", "runtime.threads=1"]
TOPK_EF = ['compression.name="topk"', "compression.fraction=0.1", "compression.error_feedback=true"]


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def exp():
    """The tiny experiment (tiny-bert + LoRA, 4 clients, all 4 in every round), built once; its
    initial state is taken right away (``Experiment.initial_state`` reads the shared model, which
    every training run overwrites)."""
    from fedfm.experiment import Experiment

    built = Experiment.build(load_config(None, TINY + LORA))
    initial = built.initial_state()
    built.initial_state = lambda: initial
    return built


@pytest.fixture(scope="module")
def ef_pipeline(exp):
    """The update pipeline of the same experiment with top-k compression and error feedback."""
    from fedfm.pipeline import build_pipeline

    cfg = load_config(None, TINY + LORA + TOPK_EF)
    return build_pipeline(cfg, [len(idx) for idx in exp.data.train])


def _rounds(exp, runtime, pipeline, rounds=2):
    """Run ``rounds`` rounds with ``runtime``; every round's results (via on_result) and the final state."""
    plan = dataclasses.replace(exp.plan, runtime=runtime, pipeline=pipeline)
    state, per_round = exp.initial_state(), []
    for _ in range(rounds):
        seen = []
        state, _ = run_round(state, plan, seen.append)
        per_round.append(seen)
    return per_round, state


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _same_tensors(a, b) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                      and _bits(a[k]) == _bits(b[k]) for k in a)


def _same_results(xs, ys) -> None:
    assert [r.client_id for r in xs] == [r.client_id for r in ys]
    for x, y in zip(xs, ys):
        assert (x.error, x.bytes_up, x.bytes_down, dict(x.metrics)) == (y.error, y.bytes_up, y.bytes_down,
                                                                          dict(y.metrics))
        assert (x.payload is None) == (y.payload is None)
        if x.payload is not None:
            assert _same_tensors(x.payload, y.payload)


def _check_parity(exp, pipeline):
    inproc = InProcessRuntime(exp.plan.runtime.trainer, pipeline)
    want, want_state = _rounds(exp, inproc, pipeline)
    with MultiProcessRuntime(exp.plan.runtime.trainer, pipeline, 2) as mp:
        got, got_state = _rounds(exp, mp, pipeline)
        states = mp.client_states
    for w, g in zip(want, got):
        _same_results(w, g)
        assert all(r.error is None for r in g) and len(g) == 4
    assert _same_tensors(want_state.params, got_state.params)
    assert _same_tensors(want_state.opt_state, got_state.opt_state)
    assert list(states) == list(inproc.client_states)
    assert all(_same_tensors(states[c], inproc.client_states[c]) for c in states)
    return states


def test_parity_with_in_process_bitwise(exp):
    states = _check_parity(exp, exp.plan.pipeline)
    assert states == {}  # no compression: no pipeline state


def test_error_feedback_state_carried_across_rounds_like_in_process(exp, ef_pipeline):
    states = _check_parity(exp, ef_pipeline)
    assert sorted(states) == [0, 1, 2, 3]  # every client kept a residual after round 1 and round 2
    assert all(any(bool(t.ne(0).any()) for t in s.values()) for s in states.values())


def test_a_client_listed_twice_trains_on_its_own_new_state(exp, ef_pipeline):
    """As in-process: the second task of a client waits for the first one's residual."""
    from fedfm.round import make_tasks

    plan = dataclasses.replace(exp.plan, pipeline=ef_pipeline)
    tasks = make_tasks(exp.initial_state(), 1, [2, 0, 2, 1], plan)
    inproc = InProcessRuntime(exp.plan.runtime.trainer, ef_pipeline)
    want = inproc.run(tasks)
    with MultiProcessRuntime(exp.plan.runtime.trainer, ef_pipeline, 2) as mp:
        got = mp.run(tasks)
    _same_results(want, got)
    assert not _same_tensors(got[0].payload, got[2].payload)  # the residual changed the second payload
    assert list(mp.client_states) == list(inproc.client_states) == [2, 0, 1]
    assert all(_same_tensors(mp.client_states[c], inproc.client_states[c]) for c in (0, 1, 2))


def test_error_feedback_through_a_spilling_store(exp, ef_pipeline, tmp_path):
    """The same residuals when the parent keeps them in a ClientStateStore that holds one in memory."""
    inproc = InProcessRuntime(exp.plan.runtime.trainer, ef_pipeline)
    want, _ = _rounds(exp, inproc, ef_pipeline)
    one = sum(t.numel() * t.element_size() for t in next(iter(inproc.client_states.values())).values())
    store = ClientStateStore(tmp_path, memory_budget=one)
    with MultiProcessRuntime(exp.plan.runtime.trainer, ef_pipeline, 2, client_states=store) as mp:
        got, _ = _rounds(exp, mp, ef_pipeline)
    for w, g in zip(want, got):
        _same_results(w, g)
    assert store.num_in_memory == 1 and store.num_on_disk == 3
    assert all(_same_tensors(store[c], inproc.client_states[c]) for c in inproc.client_states)


class Dying:
    """Wraps a trainer; in round ``rnd`` the worker training client ``client`` dies (``how``:
    "kill" = SIGKILL to itself, "exit" = os._exit(3)) or train_client raises ("raise")."""

    def __init__(self, inner, client, rnd=1, how="kill"):
        self.inner, self.client, self.rnd, self.how = inner, client, rnd, how

    def train_many(self, tasks):
        for t in tasks:
            if t.client_id == self.client and t.round == self.rnd:
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif self.how == "exit":
                    os._exit(3)
                raise ValueError(f"boom in client {t.client_id}")
        return self.inner.train_many(tasks)


def test_worker_killed_mid_round_gives_an_error_and_later_rounds_work(exp, ef_pipeline):
    inproc = InProcessRuntime(exp.plan.runtime.trainer, ef_pipeline)
    want, _ = _rounds(exp, inproc, ef_pipeline, rounds=1)
    with MultiProcessRuntime(Dying(exp.plan.runtime.trainer, client=1), ef_pipeline, 2) as mp:
        before = set(mp.pids)
        (r1, r2), _ = _rounds(exp, mp, ef_pipeline, rounds=2)
        assert len(mp.pids) == 2 and len(before & set(mp.pids)) == 1  # the dead worker was replaced
        states = dict(mp.client_states)
    assert [r.client_id for r in r1] == [0, 1, 2, 3]
    dead = r1[1]
    assert dead.error.startswith("worker died:") and "SIGKILL" in dead.error
    assert dead.update is None and dead.payload is None and dead.bytes_up == 0
    _same_results([want[0][i] for i in (0, 2, 3)], [r1[i] for i in (0, 2, 3)])  # the others as in-process
    assert all(r.error is None and r.payload is not None for r in r2)
    assert sorted(states) == [0, 1, 2, 3]  # client 1 got its first residual in round 2


def test_worker_exit_and_exception_become_errors(exp):
    with MultiProcessRuntime(Dying(exp.plan.runtime.trainer, client=2, how="exit"), exp.plan.pipeline, 2) as mp:
        (r1,), _ = _rounds(exp, mp, exp.plan.pipeline, rounds=1)
    assert r1[2].error.startswith("worker died:") and "exit code 3" in r1[2].error
    assert [r.error is None for r in r1] == [True, True, False, True]
    with MultiProcessRuntime(Dying(exp.plan.runtime.trainer, client=0, how="raise"), exp.plan.pipeline, 2) as mp:
        before = set(mp.pids)
        (r1, r2), _ = _rounds(exp, mp, exp.plan.pipeline, rounds=2)
        assert set(mp.pids) == before  # an exception is not a crash: same workers
    assert r1[0].error == "ValueError: boom in client 0" and r1[0].update is None
    assert all(r.error is None for r in r1[1:] + r2)


class Sleepy:
    """A model-free trainer: sleeps per client, trains params p to 2p + client id (so the delta is
    p + client id), reports its pid."""

    def __init__(self, delays):
        self.delays = delays

    def train_many(self, tasks):
        out = []
        for t in tasks:
            time.sleep(self.delays.get(t.client_id, 0.0))
            out.append(({k: 2 * v + t.client_id for k, v in t.params.items()},
                        {"train_loss": 0.0, "num_examples": 1.0, "pid": float(os.getpid())}))
        return out


def _tasks(n, params=None):
    params = params if params is not None else {"w": torch.zeros(3)}
    return [ClientTask(round=1, client_id=c, params=params, seed=c) for c in range(n)]


def test_results_in_task_order_with_dynamic_dispatch():
    """Client 0 takes long: the other worker takes every later task meanwhile, yet results and
    on_result calls come in task order."""
    from fedfm import wire

    with MultiProcessRuntime(Sleepy({0: 1.5}), workers=2) as mp:
        seen = []
        results = mp.run(_tasks(6), lambda r: seen.append((r.client_id, time.perf_counter())))
    assert [r.client_id for r in results] == [c for c, _ in seen] == list(range(6))
    pids = [r.metrics["pid"] for r in results]
    assert len(set(pids[1:])) == 1 and pids[0] != pids[1]  # one worker did all of 1..5 while 0 slept
    assert all(r.error is None for r in results)
    for c, r in enumerate(results):
        assert torch.equal(r.payload["w"], torch.full((3,), float(c)))
    assert results[0].bytes_down == len(wire.encode({"w": torch.zeros(3)}))


def test_distinct_params_objects_reach_the_right_tasks():
    a, b = {"w": torch.zeros(2)}, {"w": torch.full((2,), 10.0)}
    tasks = [dataclasses.replace(t, params=a if t.client_id % 2 else b) for t in _tasks(6)]
    with MultiProcessRuntime(Sleepy({}), workers=2) as mp:
        first = mp.run(tasks)
        second = mp.run(tasks[::-1])  # a new run: the workers' cached broadcasts are replaced
    for r in first + second:
        base = 0.0 if r.client_id % 2 else 10.0
        assert torch.equal(r.payload["w"], torch.full((2,), base + r.client_id))


def test_close_leaves_no_child_processes():
    before = _children()
    mp = MultiProcessRuntime(Sleepy({}), workers=2)
    pids = set(mp.pids)
    assert len(pids) == 2 and pids <= _children()
    mp.run(_tasks(3))
    mp.close()
    mp.close()  # idempotent
    assert not pids & _children() and _children() <= before
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]
    with pytest.raises(RuntimeError, match="closed"):
        mp.run(_tasks(1))


def test_garbage_collection_and_interrupted_runs_leave_no_children():
    before = _children()
    mp = MultiProcessRuntime(Sleepy({}), workers=2)
    pids = set(mp.pids)
    del mp
    gc.collect()
    assert not pids & _children()

    class Stop(Exception):
        pass

    def stop(result):
        raise Stop

    with MultiProcessRuntime(Sleepy({1: 30.0}), workers=2) as mp:
        t0 = time.perf_counter()
        with pytest.raises(Stop):
            mp.run(_tasks(4), stop)  # raises at client 0 while client 1 still sleeps
        assert time.perf_counter() - t0 < 10  # the busy worker was terminated, not waited for
        assert [r.error for r in mp.run(_tasks(4)[2:])] == [None, None]  # fresh workers took over
    assert _children() <= before


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_exit_when_the_parent_dies():
    """A parent killed without any cleanup leaves no orphans: its workers see their pipe close."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from fedfm.runtime.multiprocess import MultiProcessRuntime\n"
        "class Idle:\n"
        "    def train_many(self, tasks):\n"
        "        return []\n"
        "mp = MultiProcessRuntime(Idle(), workers=2)\n"
        "print(*mp.pids, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.time() + 20
    while time.time() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    assert not any(_running(p) for p in pids)


def test_frozen_weights_are_shared_and_trainable_ones_private(exp):
    with MultiProcessRuntime(exp.plan.runtime.trainer, exp.plan.pipeline, 1):
        frozen = [p for p in exp.handle.model.parameters() if not p.requires_grad]
        assert frozen and all(p.is_shared() for p in frozen)
        assert all(b.is_shared() for b in exp.handle.model.buffers())
        assert not any(p.is_shared() for p in exp.handle.trainable.values())


def test_share_frozen_weights_skips_trainable_tied_and_running_stats():
    from fedfm.runtime.multiprocess import share_frozen_weights

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 4),
                                torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    model[3].weight = model[0].weight  # tied frozen weight
    before = model[0].weight.detach().clone()
    moved = share_frozen_weights(model)
    assert moved == (16 + 4) * 4  # model[0]'s weight (once, though tied) and bias
    assert model[0].weight.is_shared() and model[3].weight is model[0].weight
    assert torch.equal(model[0].weight, before)
    assert not model[2].weight.is_shared() and not model[3].bias.is_shared()  # trainable
    assert not any(b.is_shared() for b in model[1].buffers())  # BatchNorm running stats
    assert share_frozen_weights(model) == 0  # already shared


def test_only_a_shared_broadcast_is_kept_encoded():
    """One broadcast for many tasks is encoded once and kept; a client's own params (downlink
    replicas) are encoded when sent and not kept; sizes are the encodings' lengths."""
    import torch

    from fedfm import wire
    from fedfm.runtime.multiprocess import _Broadcasts

    common, own = {"w": torch.ones(3)}, {"w": torch.zeros(5)}
    b = _Broadcasts()
    keys = [b.add(common), b.add(own), b.add(common)]
    assert keys == [0, 1, 0] and b.shared(0) and not b.shared(1)
    assert b.sizes == [len(wire.encode(common)), len(wire.encode(own))]
    assert b.blob(0) is b.blob(0)  # kept
    first = b.blob(1)
    assert first == wire.encode(own) and b.blob(1) is not first  # encoded again if ever asked: not kept
