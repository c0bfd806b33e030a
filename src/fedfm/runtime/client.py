"""A client's turn, the same on every runtime: train on the task, send back the encoded delta.

Runtimes differ only in how the task reaches the client and how the bytes come back; keeping
this one function shared is what makes in-process and Flower runs give the same model.
"""

from __future__ import annotations

from typing import Mapping

from fedfm import wire
from fedfm.tensors import sub
from fedfm.trainers.base import ClientTrainer
from fedfm.types import ClientResult, ClientTask, ModelUpdate


def train_client(trainer: ClientTrainer, task: ClientTask) -> tuple[bytes, dict[str, float]]:
    """Train on ``task`` and return (the encoded delta as it travels, training metrics)."""
    (trained, metrics), = trainer.train_many([task])
    return wire.encode(sub(trained, task.params)), dict(metrics)


def result_from_wire(client_id: int, up: bytes, metrics: Mapping[str, float], bytes_down: int) -> ClientResult:
    """The server's view of a client's reply: the decoded update and the bytes it cost."""
    n = int(metrics["num_examples"])
    update = ModelUpdate(delta=wire.decode(up), weight=float(n), num_examples=n)
    return ClientResult(client_id=client_id, update=update, metrics=dict(metrics),
                        bytes_up=len(up), bytes_down=bytes_down)
