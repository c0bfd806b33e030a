"""The only place that knows Flower's record layout: fedfm tasks and results <-> Flower RecordDicts.

Tensors travel as fedfm's own safetensors payload (see fedfm.wire), wrapped unchanged in one
Flower ``Array`` whose bytes Flower chunks and streams. So the bytes fedfm counts on Flower are
the bytes it counts in-process, and decoding needs nothing of Flower's numpy serialization.
Every string key of every record is defined here and nowhere else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfm import wire
from fedfm.types import ClientTask

TRAIN = "train"
"""Message type of a training task (Flower's ``MessageType.TRAIN``)."""
IDENTIFY = "query"
"""Message type of the server's "which partition do you hold?" (Flower's ``MessageType.QUERY``)."""

PARTITION_ID = "partition-id"
"""Node-config key with the SuperNode's partition (client) id, as Flower's own examples name it."""
NUM_PARTITIONS = "num-partitions"

RUN_CONFIG = "fedfm-config"
"""Run-config key holding the experiment's TOML text."""
RUN_OUT = "fedfm-out"
"""Run-config key holding the run directory the ServerApp writes to."""
RUN_VERSION = "fedfm-version"
"""Run-config key holding the version of fedfm that wrote the app (checked where it runs)."""
SIM_CONFIG_ENV = "FEDFM_FLOWER_CONFIG"
"""Environment variable with the experiment TOML for simulated ClientApps (see launch.py)."""

_PARAMS, _UPDATE, _BLOB = "fedfm.params", "fedfm.update", "safetensors"
_TASK, _RESULT, _METRICS, _IDENTITY = "fedfm.task", "fedfm.result", "fedfm.metrics", "fedfm.identity"
_CLIENT_STATE = "fedfm.client-state"
"""Key of the client's pipeline state (error-feedback residuals) in the node's persistent ``context.state``."""
_STYPE = "fedfm/safetensors"


def _blob(data: bytes) -> ArrayRecord:
    return ArrayRecord({_BLOB: Array(dtype="uint8", shape=(len(data),), stype=_STYPE, data=data)})


def _unblob(record: ArrayRecord) -> bytes:
    array = record[_BLOB]
    if array.stype != _STYPE:
        raise ValueError(f"expected a fedfm safetensors payload, got an array of stype {array.stype!r}")
    return bytes(array.data)


def encode_task(task: ClientTask, params_blob: Optional[bytes] = None) -> RecordDict:
    """A task as a RecordDict; pass ``params_blob`` to reuse one encoding of the broadcast."""
    blob = params_blob if params_blob is not None else wire.encode(task.params)
    cfg = ConfigRecord({"round": task.round, "client_id": task.client_id, "seed": task.seed,
                        "payload": json.dumps(dict(task.payload))})
    return RecordDict({_PARAMS: _blob(blob), _TASK: cfg})


def decode_task(content: RecordDict) -> tuple[ClientTask, int]:
    """(the task, the bytes its params took on the wire)."""
    blob = _unblob(content.array_records[_PARAMS])
    cfg = content.config_records[_TASK]
    task = ClientTask(round=int(cfg["round"]), client_id=int(cfg["client_id"]), params=wire.decode(blob),
                      seed=int(cfg["seed"]), payload=json.loads(str(cfg["payload"])))
    return task, len(blob)


@dataclass(frozen=True)
class WireResult:
    """A client's reply before the server decodes the update."""

    client_id: int
    up: Optional[bytes]
    metrics: Mapping[str, float]
    bytes_down: int
    error: Optional[str] = None


def encode_result(client_id: int, up: bytes, metrics: Mapping[str, float], bytes_down: int) -> RecordDict:
    return RecordDict({
        _UPDATE: _blob(up),
        _METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
        _RESULT: ConfigRecord({"client_id": client_id, "bytes_down": bytes_down}),
    })


def encode_failure(client_id: int, error: str) -> RecordDict:
    return RecordDict({_RESULT: ConfigRecord({"client_id": client_id, "error": error})})


def decode_result(content: RecordDict) -> WireResult:
    cfg = content.config_records[_RESULT]
    client_id = int(cfg["client_id"])
    if "error" in cfg:
        return WireResult(client_id=client_id, up=None, metrics={}, bytes_down=0, error=str(cfg["error"]))
    metrics = {k: float(v) for k, v in content.metric_records[_METRICS].items()}  # type: ignore[arg-type]
    return WireResult(client_id=client_id, up=_unblob(content.array_records[_UPDATE]), metrics=metrics,
                      bytes_down=int(cfg["bytes_down"]))


def encode_identity(partition_id: int) -> RecordDict:
    return RecordDict({_IDENTITY: ConfigRecord({"partition_id": partition_id})})


def decode_identity(content: RecordDict) -> int:
    return int(content.config_records[_IDENTITY]["partition_id"])


def identify_request() -> RecordDict:
    return RecordDict({_IDENTITY: ConfigRecord({})})


def load_client_state(state: RecordDict) -> "Optional[dict[str, Any]]":
    """The client's pipeline state kept in its node's persistent RecordDict, or None if it has none."""
    if _CLIENT_STATE not in state.array_records:
        return None
    return wire.decode(_unblob(state.array_records[_CLIENT_STATE]))


def store_client_state(state: RecordDict, tensors: "Optional[Mapping[str, Any]]") -> None:
    """Keep (or, for None, drop) the client's pipeline state in its node's persistent RecordDict."""
    if tensors:
        state[_CLIENT_STATE] = _blob(wire.encode(tensors))
    elif _CLIENT_STATE in state:
        del state[_CLIENT_STATE]


def run_config_of(context: Any) -> tuple[str, str]:
    """(experiment TOML text, run directory) from a Flower Context's run config."""
    import os

    rc = dict(context.run_config)
    if RUN_CONFIG not in rc and SIM_CONFIG_ENV in os.environ:  # Flower's run_simulation: empty run config
        rc = {RUN_CONFIG: os.environ[SIM_CONFIG_ENV], RUN_OUT: ""}
    missing = [k for k in (RUN_CONFIG, RUN_OUT) if k not in rc]
    if missing:
        raise ValueError(f"the Flower run config lacks {missing}; write the app with `fedfm flower app CONFIG`")
    check_version(rc)
    return str(rc[RUN_CONFIG]), str(rc[RUN_OUT])


def check_version(run_config: Any) -> None:
    """The app's components are fedfm's own modules, so the fedfm that wrote the app must be the
    fedfm that runs it (on the SuperLink and on every SuperNode): refuse a mismatch clearly."""
    from fedfm import __version__
    from fedfm.errors import FedfmError

    wrote = run_config.get(RUN_VERSION)
    if wrote is not None and str(wrote) != __version__:
        raise FedfmError(f"this Flower app was written by fedfm {wrote}, but this machine runs fedfm {__version__}; "
                         f"install fedfm=={wrote} here or rewrite the app with `fedfm flower app`")


def partition_of(context: Any) -> int:
    """The SuperNode's partition id from its node config."""
    nc = context.node_config
    if PARTITION_ID not in nc:
        raise ValueError(f"this SuperNode has no {PARTITION_ID!r} in its node config; start it with "
                         f"--node-config '{PARTITION_ID}=<client id> {NUM_PARTITIONS}=<clients>'")
    return int(nc[PARTITION_ID])
