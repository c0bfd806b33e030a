"""A client's turn, the same on every runtime: train on the task, run the client pipeline (clip,
noise, compress; see fedfm.pipeline), send back the encoded payload.

Runtimes differ only in how the task reaches the client, where the client's pipeline state
lives, and how the bytes come back; keeping this one function shared is what makes in-process
and Flower runs give the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

from fedfm import wire
from fedfm.tensors import sub
from fedfm.trainers.base import ClientTrainer
from fedfm.types import ClientResult, ClientTask, NamedTensors

if TYPE_CHECKING:
    import torch

    from fedfm.pipeline import UpdatePipeline


@dataclass(frozen=True)
class ClientReply:
    """A client's turn as it leaves the client.

    Attributes:
        up: the encoded payload as it travels, or None when the client sends nothing.
        metrics: training and pipeline metrics.
        state: the client's new pipeline state (error-feedback residual), for its runtime to keep.
        error: why nothing is sent.
    """

    up: Optional[bytes]
    metrics: dict[str, float]
    state: "Optional[dict[str, torch.Tensor]]"
    error: Optional[str] = None


def train_client(trainer: ClientTrainer, task: ClientTask, pipeline: "UpdatePipeline",
                 state: Optional[NamedTensors] = None) -> ClientReply:
    """Train on ``task``, pass the delta through the client pipeline with the client's ``state``,
    and encode the payload."""
    (trained, metrics), = trainer.train_many([task])
    return client_reply(task, trained, metrics, pipeline, state)


def client_reply(task: ClientTask, trained: NamedTensors, metrics: Mapping[str, float], pipeline: "UpdatePipeline",
                 state: Optional[NamedTensors] = None) -> ClientReply:
    """The reply of a client that trained ``task`` into ``trained``: its delta through the client
    pipeline (with the client's ``state``), encoded."""
    out = pipeline.client_step(sub(trained, task.params), task, state)
    if out.payload is None:
        return ClientReply(None, dict(metrics), out.state, out.error)
    return ClientReply(wire.encode(out.payload), {**metrics, **out.metrics}, out.state)


def result_from_wire(client_id: int, up: bytes, metrics: Mapping[str, float], bytes_down: int) -> ClientResult:
    """The server's view of a client's reply: the payload as it arrived and the bytes it cost (the
    round decodes the payload into the update, see UpdatePipeline.receive)."""
    try:
        payload = wire.decode(up)
    except Exception as e:  # safetensors, struct and json each raise their own type on bad bytes
        return ClientResult(client_id=client_id, update=None, metrics=dict(metrics), bytes_up=len(up),
                            bytes_down=bytes_down, error=f"undecodable payload: {type(e).__name__}: {e}")
    return ClientResult(client_id=client_id, update=None, metrics=dict(metrics), bytes_up=len(up),
                        bytes_down=bytes_down, payload=payload)
