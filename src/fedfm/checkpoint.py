"""Server-state checkpoints: safetensors for tensors, a small JSON as the commit point.

The JSON is replaced atomically after its tensor files are fully written, so a process
killed at any moment leaves either the previous checkpoint or the new one, never half.

Files: ``state-XXXXX.safetensors`` (params, optimizer state), ``clients-XXXXX.safetensors`` (the
in-process runtime's per-client pipeline state, e.g. error-feedback residuals, when there is
any), ``replicas-XXXXX.safetensors`` (downlink compression's per-client replicas, when on), and
``state.json`` naming them, with ``ServerState.extra`` and the runner's own fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from fedfm.types import ServerState

if TYPE_CHECKING:
    import torch

    from fedfm.types import NamedTensors

STATE_JSON = "state.json"


def save_state(directory: Path, state: ServerState, meta: dict[str, Any],
               client_states: "Optional[Mapping[int, NamedTensors]]" = None,
               replicas: "Optional[Mapping[int, NamedTensors]]" = None) -> None:
    """Write ``state`` (and the clients' pipeline states, and downlink compression's replicas)
    and commit them with ``meta`` in state.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{state.round:05d}.safetensors"
    tensors = {f"params/{k}": v.contiguous() for k, v in state.params.items()}
    tensors.update({f"opt/{k}": v.contiguous() for k, v in state.opt_state.items()})
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"params": json.dumps(list(state.params)),
                                           "opt": json.dumps(list(state.opt_state))})
    os.replace(tmp, directory / name)
    record: dict[str, Any] = {**meta, "round": state.round, "file": name, "extra": dict(state.extra)}
    if client_states:
        record["clients"] = _save_clients(directory, state.round, client_states)
    if replicas:
        record["replicas"] = _save_clients(directory, state.round, replicas, "replicas")
    _write_json_atomic(directory / STATE_JSON, record)
    keep = {name, record.get("clients"), record.get("replicas")}
    for old in [*directory.glob("state-*.safetensors"), *directory.glob("clients-*.safetensors"),
                *directory.glob("replicas-*.safetensors")]:
        if old.name not in keep:
            old.unlink()


def load_state(directory: Path) -> Optional[tuple[ServerState, dict[str, Any]]]:
    """The last committed state and its state.json fields, or None if there is none."""
    from safetensors import safe_open

    meta_path = directory / STATE_JSON
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    with safe_open(str(directory / meta["file"]), framework="pt") as f:
        header = f.metadata()
        params = {k: f.get_tensor(f"params/{k}") for k in json.loads(header["params"])}
        opt = {k: f.get_tensor(f"opt/{k}") for k in json.loads(header["opt"])}
    state = ServerState(round=int(meta["round"]), params=params, opt_state=opt, extra=meta.get("extra", {}))
    return state, meta


def load_client_states(directory: Path, meta: Mapping[str, Any], kind: str = "clients"
                       ) -> "dict[int, dict[str, torch.Tensor]]":
    """The per-client pipeline states (``kind="replicas"``: downlink replicas) committed with the
    checkpoint whose state.json is ``meta``."""
    from safetensors import safe_open

    if not meta.get(kind):
        return {}
    with safe_open(str(directory / meta[kind]), framework="pt") as f:
        names = json.loads(f.metadata()["clients"])
        return {int(c): {k: f.get_tensor(f"{c}/{k}") for k in keys} for c, keys in names.items()}


def _save_clients(directory: Path, rnd: int, client_states: "Mapping[int, NamedTensors]", kind: str = "clients") -> str:
    from safetensors.torch import save_file

    name = f"{kind}-{rnd:05d}.safetensors"
    tensors = {f"{c}/{k}": v.contiguous() for c, s in client_states.items() for k, v in s.items()}
    names = {str(c): list(s) for c, s in client_states.items()}
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"clients": json.dumps(names)})
    os.replace(tmp, directory / name)
    return name


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
