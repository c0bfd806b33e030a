"""Server-state checkpoints: safetensors for tensors, a small JSON as the commit point.

The JSON is replaced atomically after its tensor file is fully written, so a process
killed at any moment leaves either the previous checkpoint or the new one, never half.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from fedfm.types import ServerState

STATE_JSON = "state.json"


def save_state(directory: Path, state: ServerState, extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    name = f"state-{state.round:05d}.safetensors"
    tensors = {f"params/{k}": v.contiguous() for k, v in state.params.items()}
    tensors.update({f"opt/{k}": v.contiguous() for k, v in state.opt_state.items()})
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"params": json.dumps(list(state.params)),
                                           "opt": json.dumps(list(state.opt_state))})
    os.replace(tmp, directory / name)
    _write_json_atomic(directory / STATE_JSON, {"round": state.round, "file": name, **extra})
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_state(directory: Path) -> Optional[tuple[ServerState, dict[str, Any]]]:
    """The last committed state and its extra fields, or None if there is none."""
    from safetensors import safe_open

    meta_path = directory / STATE_JSON
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    with safe_open(str(directory / meta["file"]), framework="pt") as f:
        header = f.metadata()
        params = {k: f.get_tensor(f"params/{k}") for k in json.loads(header["params"])}
        opt = {k: f.get_tensor(f"opt/{k}") for k in json.loads(header["opt"])}
    return ServerState(round=int(meta["round"]), params=params, opt_state=opt), meta


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
