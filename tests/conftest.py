"""Shared fixtures. Tests never touch a hub: everything is offline and tiny."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fedfm.config import load_config  # noqa: E402

TINY = [
    'model.name="tiny-bert"', "model.max_length=32", 'adapter.method="full"',
    "data.max_examples=600", "data.test_fraction=0.25",
    'partition.method="iid"', "federation.clients=4", "federation.clients_per_round=2",
    "federation.rounds=2", "client.max_steps=3", "client.batch_size=16", "client.lr=1e-3",
    "runtime.threads=1",
]


class Recorder:
    """Wraps a runtime and keeps the tasks it was asked to send and the results it handed back."""

    def __init__(self, inner):
        self.inner, self.sent, self.results = inner, [], []

    def run(self, tasks, on_result=None):
        self.sent.extend(tasks)
        out = self.inner.run(tasks, on_result)
        self.results.extend(out)
        return out


@pytest.fixture
def tiny_cfg():
    """A config factory: the tiny experiment with extra ``key=value`` overrides."""

    def make(*overrides: str):
        return load_config(None, TINY + list(overrides))

    return make


@pytest.fixture(scope="session")
def rt_cache() -> Path:
    """The cached Rotten Tomatoes file (fetched once per machine)."""
    from fedfm.data.sources import BUNDLED

    return BUNDLED.get("rotten-tomatoes").fetch()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (threads only add contention), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def interrupted_equals_full(tmp_path):
    """Run ``cfg`` straight through and again killed after round ``kill_after``, then resumed;
    assert their metrics lines agree (wall times aside) and return the full run's lines."""
    import json

    from fedfm.runner import Callbacks, resume, run

    class Killed(Exception):
        pass

    def check(cfg, kill_after: int = 2):
        run(cfg, tmp_path / "full")

        def die(line):
            if line["round"] == kill_after:
                raise Killed

        with pytest.raises(Killed):
            run(cfg, tmp_path / "cut", Callbacks(on_round_end=die))
        resume(tmp_path / "cut")
        lines = {d: [{k: v for k, v in json.loads(l).items() if k not in ("wall_s", "elapsed_s")}
                     for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "cut")}
        assert lines["full"] == lines["cut"]
        return lines["full"]

    return check
