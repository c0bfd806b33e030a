"""Flower deployment tooling: the app for an experiment, a local cluster, TLS material, node keys,
and submitting a run and waiting for its end.

Written for flwr 1.41, whose SuperLink serves its Fleet, Control and ServerAppIo APIs on one
HTTP(S) port. What fedfm writes or starts:

- ``write_app``: a *thin* Flower app, a ``pyproject.toml`` whose components are fedfm's own
  ``ServerApp``/``ClientApp`` (fedfm must be installed wherever the app runs) and whose run config
  carries the experiment's TOML text and its run directory.
- ``up``/``down``: one SuperLink and N SuperNodes as real processes on loopback, ports chosen
  free at start, every process recorded in a state file so ``down`` stops exactly those (and
  the helper processes Flower starts in their own sessions).
- ``make_tls``: a throwaway CA and a SuperLink certificate for 127.0.0.1/localhost;
  ``make_node_keys``: ECDSA P-384 key pairs in OpenSSH format, the format Flower's node
  authentication loads; ``register_node``: adds a public key to the SuperLink.
- ``submit``: ``flwr run`` then polls the run's status, since ``flwr run`` exits 0 even for a
  failed run; every wait is bounded.

Flower's CLI reads its connections from ``$FLWR_HOME/config.toml``; fedfm keeps its own
FLWR_HOME inside the cluster's state directory, so nothing touches the user's ``~/.flwr``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from fedfm.errors import FedfmError

CONNECTION = "fedfm"
"""Name of the SuperLink connection fedfm writes into its FLWR_HOME."""
STATE_FILE = "cluster.json"


def flower_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process fedfm starts: its own FLWR_HOME, no telemetry, no
    update check, no per-run ``uv sync`` (apps use the current environment)."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by
    # name: put this environment's scripts first on PATH, also when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    return env


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


# --------------------------------------------------------------------------- the app


def write_app(config_text: str, run_dir: Path, app_dir: Path, name: str = "fedfm-experiment") -> Path:
    """Write a runnable Flower app for one experiment into ``app_dir``; returns it."""
    import tomli_w

    from fedfm import __version__
    from fedfm.runtime.flower import codec

    app_dir.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": name, "version": "1.0.0", "description": "A fedfm experiment as a Flower app",
                    "license": "Apache-2.0", "dependencies": ["fedfm[flower]"]},
        "tool": {"flwr": {"app": {
            "publisher": "fedfm",
            "components": {"serverapp": "fedfm.runtime.flower.server_app:app",
                           "clientapp": "fedfm.runtime.flower.client_app:app"},
            "config": {codec.RUN_CONFIG: config_text, codec.RUN_OUT: str(run_dir.resolve()),
                       codec.RUN_VERSION: __version__},
        }}},
    }
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    (app_dir / "README.md").write_text(
        "# A fedfm experiment as a Flower app\n\n"
        "Written by `fedfm flower app`. The components are fedfm's ServerApp and ClientApp, so fedfm\n"
        "must be installed where the SuperLink and every SuperNode run. Submit with\n"
        "`flwr run . <connection>`, or let `fedfm run` do it (runtime.name = \"flower\").\n"
        f"The run directory is `{run_dir.resolve()}` on the SuperLink's machine.\n", encoding="utf-8")
    return app_dir


# --------------------------------------------------------------------------- TLS and node keys


def make_tls(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1"), days: int = 30) -> dict[str, Path]:
    """A CA and a SuperLink certificate signed by it, valid for ``hosts``. Returns their paths
    (``ca``, ``cert``, ``key``). For trying TLS on loopback; a real deployment uses the
    institutions' own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    def private(path: Path, key: Any) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfm local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "superlink.pem", "key": directory / "superlink.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    private(directory / "ca.key", ca_key)
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    private(paths["key"], key)
    return paths


def make_node_keys(directory: Path, names: Sequence[str]) -> dict[str, Path]:
    """One ECDSA P-384 key pair per name (OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``);
    returns name -> private key path (the public key is beside it, with ``.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        path = directory / name
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.with_name(name + ".pub").write_bytes(pub + f" {name}\n".encode())
        out[name] = path
    return out


# --------------------------------------------------------------------------- the Flower CLI


def write_connection(home: Path, address: str, ca: Optional[Path] = None, name: str = CONNECTION) -> None:
    """Point the Flower CLI at a SuperLink (in ``home``/config.toml, fedfm's own FLWR_HOME)."""
    import tomli_w

    from fedfm.config import tomllib

    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    doc = tomllib.loads(path.read_text()) if path.is_file() else {}
    conn: dict[str, Any] = {"address": address}
    if ca is not None:
        conn["root-certificates"] = str(Path(ca).resolve())
    else:
        conn["insecure"] = True
    doc.setdefault("superlink", {})[name] = conn
    doc["superlink"]["default"] = name
    path.write_text(tomli_w.dumps(doc))


def flwr(args: Sequence[str], home: Path, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``flwr ARGS --format json`` and return its JSON answer.

    Raises:
        FedfmError: the command failed, timed out, or Flower answered ``success: false``.
    """
    cmd = [_bin("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(cmd, env=flower_env(home), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedfmError(f"`flwr {' '.join(args)}` did not answer within {timeout:g} s") from None
    text = done.stdout.strip()
    try:
        answer = json.loads(text[text.index("{"):]) if "{" in text else {}
    except json.JSONDecodeError:
        answer = {}
    if done.returncode != 0 or not answer.get("success", False):
        why = answer.get("error-message") or (done.stderr or done.stdout).strip()[-600:]
        raise FedfmError(f"`flwr {' '.join(args)}` failed: {why}")
    return answer


def register_node(public_key: Path, home: Path) -> int:
    """Add a SuperNode's public key to the SuperLink; returns the node id Flower assigns."""
    return int(flwr(["supernode", "register", str(public_key), CONNECTION], home)["node-id"])


def submit(app_dir: Path, home: Path, timeout: float, poll_s: float = 2.0) -> dict[str, Any]:
    """Submit the app to the SuperLink of ``home``'s connection and wait for the run to end.

    Returns the final run record. Raises FedfmError if the SuperLink cannot be reached, the run
    fails, or it does not finish within ``timeout`` seconds (the run is then stopped)."""
    run_id = int(flwr(["run", str(app_dir), CONNECTION], home, timeout=120)["run-id"])
    deadline = time.monotonic() + timeout
    while True:
        runs = flwr(["ls", CONNECTION, "--run-id", str(run_id)], home).get("runs", [])
        status = str(runs[0].get("status", "")) if runs else ""
        if status.startswith("finished"):
            if status != "finished:completed":
                raise FedfmError(f"Flower run {run_id} ended as {status!r}: "
                                 f"{runs[0].get('status-details', '') or 'see `flwr log`'}")
            return dict(runs[0])
        if time.monotonic() > deadline:
            try:
                flwr(["stop", str(run_id), CONNECTION], home)
            finally:
                raise FedfmError(f"Flower run {run_id} did not finish within {timeout:g} s (status {status!r}); stopped it")
        time.sleep(poll_s)


# --------------------------------------------------------------------------- a local cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    """A SuperLink and SuperNodes fedfm started on loopback, as recorded in the state file."""

    state_dir: str
    port: int
    superlink: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # partition id (as str) -> pid
    tls: Optional[dict[str, str]] = None
    auth: bool = False

    @property
    def home(self) -> Path:
        return Path(self.state_dir) / "flwr-home"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def save(self) -> None:
        (Path(self.state_dir) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> "Cluster":
        path = state_dir / STATE_FILE
        if not path.is_file():
            raise FedfmError(f"no cluster state in {str(state_dir)!r}; start one with `fedfm flower up`")
        return cls(**json.loads(path.read_text()))

    def start_node(self, partition: int, num_partitions: int, key: Optional[Path] = None,
                   max_wait_s: float = 30.0) -> subprocess.Popen:
        """Start one SuperNode holding ``partition``; bounded reconnection (``max_wait_s``)."""
        d = Path(self.state_dir) / f"node{partition}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [_bin("flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
               "--node-config", f"partition-id={partition} num-partitions={num_partitions}",
               "--max-wait-time", str(max_wait_s)]
        cmd += ["--root-certificates", self.tls["ca"]] if self.tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        proc = _spawn(cmd, d, self.home)
        self.nodes[str(partition)] = proc.pid
        self.save()
        return proc


def up(state_dir: Path, nodes: int, tls: bool = False, auth: bool = False, wait_s: float = 60.0) -> Cluster:
    """Start a SuperLink and ``nodes`` SuperNodes (partitions 0..nodes-1) on loopback and wait
    until all nodes are online. With ``auth``, TLS is on too (Flower requires it) and each node
    gets a registered key pair."""
    state_dir = state_dir.resolve()
    if (state_dir / STATE_FILE).is_file():
        raise FedfmError(f"{str(state_dir)!r} already has a cluster; stop it with `fedfm flower down` first")
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(state_dir=str(state_dir), port=free_port(), auth=auth)
    if tls or auth:
        cluster.tls = {k: str(v) for k, v in make_tls(state_dir / "tls").items()}
    write_connection(cluster.home, cluster.address, Path(cluster.tls["ca"]) if cluster.tls else None)
    cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(cluster.port),
           "--disable-runtime-dependency-installation"]
    if cluster.tls:
        cmd += ["--ssl-ca-certfile", cluster.tls["ca"], "--ssl-certfile", cluster.tls["cert"],
                "--ssl-keyfile", cluster.tls["key"]]
    else:
        cmd.append("--insecure")
    if auth:
        cmd.append("--enable-supernode-auth")
    try:
        cluster.superlink = _spawn(cmd, state_dir / "superlink", cluster.home).pid
        cluster.save()
        _wait_port(cluster.port, wait_s)
        keys = make_node_keys(state_dir / "keys", [f"node{i}" for i in range(nodes)]) if auth else {}
        for i in range(nodes):
            if auth:
                register_node(keys[f"node{i}"].with_name(f"node{i}.pub"), cluster.home)
            cluster.start_node(i, nodes, keys.get(f"node{i}"))
        wait_online(cluster, nodes, wait_s)
    except BaseException:
        down(state_dir)
        raise
    return cluster


def online_nodes(cluster: Cluster) -> int:
    nodes = flwr(["supernode", "ls", CONNECTION], cluster.home).get("nodes", [])
    return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")


def wait_online(cluster: Cluster, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while online_nodes(cluster) < count:
        if time.monotonic() > deadline:
            raise FedfmError(f"fewer than {count} SuperNodes came online within {timeout:g} s; "
                             f"see the logs in {cluster.state_dir}")
        time.sleep(1.0)


def down(state_dir: Path, grace_s: float = 10.0) -> list[int]:
    """Stop every process the cluster in ``state_dir`` started (and their descendants, and the
    helpers Flower starts in their own sessions that watch them). Returns the pids stopped."""
    import psutil

    state_dir = state_dir.resolve()
    path = state_dir / STATE_FILE
    if not path.is_file():
        return []
    cluster = Cluster.load(state_dir)
    roots = [p for p in [cluster.superlink, *cluster.nodes.values()] if p]
    procs: dict[int, Any] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        for p in [root, *root.children(recursive=True)]:
            procs[p.pid] = p
    # Flower's superexec runs in a new session with --parent-pid; find those that watch our roots
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "--parent-pid" in cmd:
            i = cmd.index("--parent-pid")
            if i + 1 < len(cmd) and cmd[i + 1].isdigit() and int(cmd[i + 1]) in roots:
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    path.unlink()
    return sorted(procs)


def _spawn(cmd: list[str], cwd: Path, home: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / "process.log", "ab")
    return subprocess.Popen(cmd, cwd=cwd, env=flower_env(home), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FedfmError(f"the SuperLink did not open port {port} within {timeout:g} s")
