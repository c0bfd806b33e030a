"""A real Flower deployment on loopback: a SuperLink and 3 SuperNodes as separate processes,
talking HTTPS with TLS and node authentication, ports chosen free at run time. Every process is
stopped at the end, also when a test fails (the module fixture's finally)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest
import torch

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")

from fedfm.checkpoint import load_state  # noqa: E402
from fedfm.errors import FedfmError  # noqa: E402
from fedfm.runner import run  # noqa: E402
from fedfm.runtime.flower import deploy  # noqa: E402

pytestmark = pytest.mark.slow
NODES = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("cluster")
    c = deploy.up(state, NODES, tls=True, auth=True, wait_s=180)
    try:
        yield c
    finally:
        stopped = deploy.down(state)
        assert stopped, "down found nothing to stop"
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in stopped)


def _flower(tiny_cfg, cluster, *extra):
    return tiny_cfg("federation.clients=3", "federation.clients_per_round=3", 'runtime.name="flower"',
                    f'runtime.address="{cluster.address}"', f'runtime.tls.ca="{cluster.tls["ca"]}"', *extra)


def test_deployment_equals_inprocess_bitwise(tmp_path, tiny_cfg, cluster):
    cfg = _flower(tiny_cfg, cluster, 'adapter.method="lora"', "adapter.dropout=0.1")
    run(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"name": "inprocess"})}), tmp_path / "local")
    run(cfg, tmp_path / "flower")
    a, _ = load_state(tmp_path / "local" / "checkpoints")
    b, _ = load_state(tmp_path / "flower" / "checkpoints")
    assert a.round == b.round == 2 and list(a.params) == list(b.params)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    local = [json.loads(l) for l in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    remote = [json.loads(l) for l in (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    assert [l.get("bytes_up") for l in local] == [l.get("bytes_up") for l in remote]


def _refused(cluster, tmp_path, key):
    cmd = [deploy._bin("flower-supernode"), "--superlink", cluster.address, "--root-certificates",
           cluster.tls["ca"], "--port", str(deploy.free_port()), "--node-config", "partition-id=0 num-partitions=3",
           "--max-retries", "2", "--max-wait-time", "20"]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    log = tmp_path / f"refused-{key.name if key else 'nokey'}.log"
    with log.open("wb") as f:  # a file, not a pipe: Flower's helper processes would hold a pipe open
        proc = subprocess.Popen(cmd, env=deploy.flower_env(cluster.home), stdout=f, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)
        try:
            rc = proc.wait(timeout=120)
        finally:
            for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
                p.kill()
            if proc.poll() is None:
                proc.kill()
    return rc, log.read_text(errors="replace")


def test_unregistered_or_keyless_node_is_refused(tmp_path, cluster):
    stranger = deploy.make_node_keys(tmp_path / "keys", ["stranger"])["stranger"]
    rc, log = _refused(cluster, tmp_path, stranger)
    assert rc != 0 and ("2004" in log or "Failed to activate" in log), log[-800:]
    rc, log = _refused(cluster, tmp_path, None)
    assert rc != 0 and ("2001" in log or "must be registered" in log), log[-800:]


def test_killed_node_does_not_stall_the_round_and_rejoins(tmp_path, tiny_cfg, cluster):
    # 600 local steps make each round last seconds even on an idle machine, so the kill below
    # lands while round 2 is in flight (with the tiny config's 3 steps, round 2 could finish first)
    cfg = _flower(tiny_cfg, cluster, "federation.rounds=3", "runtime.round_timeout=150", "runtime.min_clients=3",
                  "client.max_steps=600", "client.epochs=100")
    out = tmp_path / "run"
    victim = "2"

    def kill_during_round_2():
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:  # round 1 is done
                break
            time.sleep(0.5)
        time.sleep(1.0)  # round 2's messages are out (they go as soon as round 1's line is written)
        psutil.Process(cluster.nodes[victim]).send_signal(signal.SIGKILL)
        # the SuperLink refuses a SIGKILLed node's key until it marks the node offline (~60 s)
        while deploy.online_nodes(cluster) >= NODES:
            time.sleep(2.0)
        for _ in range(30):
            proc = cluster.start_node(int(victim), NODES, cluster_key(cluster, victim), max_wait_s=10)
            for _ in range(40):
                time.sleep(1.0)
                if proc.poll() is not None:
                    break  # refused (2004) while the SuperLink still thinks the old node is online: retry
                if deploy.online_nodes(cluster) >= NODES:
                    return
            if proc.poll() is None:
                proc.kill()
        raise AssertionError("the killed SuperNode never rejoined")

    killer = threading.Thread(target=kill_during_round_2, daemon=True)
    killer.start()
    run(cfg, out)
    killer.join(timeout=60)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [0, 1, 2, 3]
    assert lines[1]["rejected"] == []
    assert [r["client"] for r in lines[2]["rejected"]] == [2]
    assert lines[3]["rejected"] == []  # it rejoined: round 3 waited for 3 nodes (min_clients) and got them


def cluster_key(cluster, partition):
    from pathlib import Path

    return Path(cluster.state_dir) / "keys" / f"node{partition}"


def test_unreachable_superlink_fails_fast_with_a_clear_error(tmp_path, tiny_cfg):
    cfg = tiny_cfg('runtime.name="flower"', f'runtime.address="127.0.0.1:{deploy.free_port()}"')
    t0 = time.monotonic()
    with pytest.raises(FedfmError, match="(?i)unavailable|connect"):
        run(cfg, tmp_path / "run")
    assert time.monotonic() - t0 < 120


def test_missing_certificate_is_a_config_error(tmp_path, tiny_cfg):
    from fedfm.errors import ConfigError

    cfg = tiny_cfg('runtime.name="flower"', f'runtime.tls.ca="{tmp_path / "nope.pem"}"')
    with pytest.raises(ConfigError, match="runtime.tls.ca.*does not exist"):
        run(cfg, tmp_path / "run")
