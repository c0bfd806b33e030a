"""A client's turn, the same on every runtime: train on the task, run the client pipeline (clip,
noise, compress; see fedfm.pipeline), send back the encoded payload.

Runtimes differ only in how the task reaches the client, where the client's pipeline state
lives, and how the bytes come back; keeping this one function shared is what makes in-process
and Flower runs give the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping, Optional

from fedfm import wire
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


ALGORITHM_STATE = "algo/"
"""Prefix of the algorithm's keys in a client's state (SCAFFOLD's c_i). Personal parameters
(fedfm.personalization) are under ``personal/``; the other keys are the update pipeline's
(error-feedback residuals)."""
PERSONAL_STATE = "personal/"


def split_state(state: Optional[NamedTensors]
                ) -> "tuple[Optional[dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, torch.Tensor]]":
    """A client's state -> (its pipeline part or None, its algorithm part, its personal
    parameters), the last two without their prefixes."""
    if not state:
        return None, {}, {}
    pipe, algo, personal = {}, {}, {}
    for k, v in state.items():
        if k.startswith(ALGORITHM_STATE):
            algo[k[len(ALGORITHM_STATE):]] = v
        elif k.startswith(PERSONAL_STATE):
            personal[k[len(PERSONAL_STATE):]] = v
        else:
            pipe[k] = v
    return pipe or None, algo, personal


def merge_state(pipe: Optional[NamedTensors], algo: Optional[NamedTensors],
                personal: Optional[NamedTensors] = None) -> "Optional[dict[str, torch.Tensor]]":
    out = {**(pipe or {}), **{ALGORITHM_STATE + k: v for k, v in (algo or {}).items()},
           **{PERSONAL_STATE + k: v for k, v in (personal or {}).items()}}
    return out or None


def with_client_state(task: ClientTask, trainer: Any, state: Optional[NamedTensors]) -> ClientTask:
    """``task`` as the client's trainer sees it: with the client's own algorithm state (under
    CLIENT_STATE) and personal parameters (under fedfm.personalization.PERSONAL) in its payload,
    when the algorithm or the trainer keeps them; ``task`` itself otherwise."""
    from fedfm.algorithms.base import CLIENT_STATE, has_client_state
    from fedfm.personalization import PERSONAL

    algorithm = getattr(trainer, "algorithm", None)
    stateful = has_client_state(algorithm)
    personal = getattr(trainer, "personal", None) is not None or getattr(trainer, "pruning", None) is not None
    if not (stateful or personal):
        return task
    _, algo, own = split_state(state)
    extra = {**({CLIENT_STATE: algo} if stateful else {}), **({PERSONAL: own} if personal else {})}
    return replace(task, payload={**task.payload, **extra})


def payload_bytes(payload: Mapping[str, Any]) -> int:
    """Bytes of the tensors an algorithm sends with a task (SCAFFOLD's control variate), as
    ``wire.encode`` would write them; scalars ride in the message header and count 0."""
    from fedfm.algorithms.base import CLIENT_STATE

    return sum(wire.encoded_size(v) for k, v in payload.items()
               if k != CLIENT_STATE and isinstance(v, Mapping) and v)


def download_bytes(task: ClientTask, broadcast: int) -> int:
    """Bytes a client downloads for ``task``: the broadcast (``broadcast`` bytes encoded), only
    the LoRA components a lower-rank client holds, or the compressed correction of what it holds
    (fedfm.compression.downlink); plus the algorithm's tensors."""
    from fedfm.compression.downlink import DOWN_BYTES

    params = int(task.payload[DOWN_BYTES]) if DOWN_BYTES in task.payload else params_bytes(task, broadcast)
    return params + payload_bytes(task.payload) + int(task.payload.get("extra_bytes_down", 0))


def params_bytes(task: ClientTask, broadcast: int) -> int:
    """Bytes of the trainable params a client holds for ``task``: the broadcast (``broadcast``
    bytes encoded), or only the LoRA components of a lower-rank client."""
    from fedfm.adapters.ranks import RANK, truncate
    rank = task.payload.get(RANK)
    return broadcast if rank is None else wire.encoded_size(truncate(task.params, int(rank)))


def train_client(trainer: ClientTrainer, task: ClientTask, pipeline: "UpdatePipeline",
                 state: Optional[NamedTensors] = None) -> ClientReply:
    """Train on ``task``, pass the delta through the client pipeline with the client's ``state``,
    and encode the payload."""
    task = with_client_state(task, trainer, state)
    (trained, metrics), = trainer.train_many([task])
    return client_reply(task, trained, metrics, pipeline, state, getattr(trainer, "algorithm", None))


def client_step(task: ClientTask, trained: NamedTensors, pipeline: "UpdatePipeline",
                state: Optional[NamedTensors], algorithm: Any, metrics: Mapping[str, float]) -> "tuple[Any, Any]":
    """(the pipeline's ClientOutput, the client's whole new state): the delta through the client
    pipeline with its part of ``state``, and the algorithm's new client state."""
    from fedfm.algorithms.base import has_client_state

    from fedfm.adapters.ranks import RANK

    n = len(PERSONAL_STATE)
    personal = {k[n:]: v for k, v in trained.items() if k.startswith(PERSONAL_STATE)}
    if RANK in metrics:  # a self-pruning client sends at the rank it trained at (HetLoRA)
        task = replace(task, payload={**task.payload, RANK: int(metrics[RANK])})
    delta = delta_in_place({k: trained[k] for k in task.params}, task.params)
    pipe, algo, own = split_state(state)
    out = pipeline.client_step(delta, task, pipe)
    if has_client_state(algorithm) and out.payload is not None:
        # a client that sends nothing (a NaN/Inf update) keeps its old state: the update never counts
        algo = algorithm.client_finish(task, delta, metrics) or {}
    return out, merge_state(out.state, algo, personal or own)


def delta_in_place(trained: NamedTensors, start: NamedTensors) -> "dict[str, torch.Tensor]":
    """``trained - start``, written into ``trained``'s own tensors where that is safe.

    A trainer hands back fresh copies of the trained values (ModelHandle.get_params), used once,
    so the delta can take their place instead of being a second copy: on full fine-tuning of an
    11M-parameter model that is 44 MB less at the peak of every client's turn. A tensor that
    shares memory with ``start``, needs a gradient, or differs in dtype or shape is left alone
    and the delta is a new tensor, as ``sub`` computes it; the values are the same either way.
    """
    out = {}
    for k, t in trained.items():
        s = start[k]
        if (t.is_floating_point() and t.dtype == s.dtype and t.shape == s.shape and not t.requires_grad
                and t.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()):
            out[k] = t.sub_(s)
        else:
            out[k] = t - s
    return out


def client_reply(task: ClientTask, trained: NamedTensors, metrics: Mapping[str, float], pipeline: "UpdatePipeline",
                 state: Optional[NamedTensors] = None, algorithm: Any = None) -> ClientReply:
    """The reply of a client that trained ``task`` into ``trained``: its delta through the client
    pipeline (with the client's ``state``), encoded."""
    out, new_state = client_step(task, trained, pipeline, state, algorithm, metrics)
    if out.payload is None:
        return ClientReply(None, dict(metrics), new_state, out.error)
    return ClientReply(wire.encode(out.payload), {**metrics, **out.metrics}, new_state)


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
