"""fedfm: Federated Foundation Models.

The public API is imported lazily so `import fedfm` (and `fedfm --help`) stays fast:
torch, transformers and peft load only when something that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ExperimentConfig": "fedfm.config",
    "load_config": "fedfm.config",
    "Experiment": "fedfm.experiment",
    "run": "fedfm.runner",
    "resume": "fedfm.runner",
    "run_round": "fedfm.round",
    "RoundPlan": "fedfm.round",
    "ModelUpdate": "fedfm.types",
    "ClientTask": "fedfm.types",
    "ClientResult": "fedfm.types",
    "ServerState": "fedfm.types",
    "RoundReport": "fedfm.types",
    "FedfmError": "fedfm.errors",
    "ConfigError": "fedfm.errors",
    "DataError": "fedfm.errors",
    "ModelError": "fedfm.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedfm' has no attribute {name!r}")
