"""The default runtime: every client runs in this process, one after another, on one
shared model. Tasks and payloads still go through the wire encoding, so the bytes
reported are the bytes a deployment would move."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from fedfm import wire
from fedfm.pipeline import UpdatePipeline
from fedfm.runtime.client import client_reply, result_from_wire
from fedfm.trainers.base import ClientTrainer
from fedfm.trainers.vectorized import VectorizedTrainer
from fedfm.types import ClientResult, ClientTask, NamedTensors

if TYPE_CHECKING:
    import torch


@dataclass
class InProcessRuntime:
    """Attributes:
        trainer: trains any client on the shared model.
        pipeline: the client side of the update pipeline.
        client_states: client id -> its pipeline state (error-feedback residuals), what each client
            would keep on its own device; the runner checkpoints it with the server state.
    """

    trainer: ClientTrainer
    pipeline: UpdatePipeline = field(default_factory=UpdatePipeline)
    client_states: "dict[int, dict[str, torch.Tensor]]" = field(default_factory=dict)

    def run(
        self, tasks: Sequence[ClientTask], on_result: Optional[Callable[[ClientResult], None]] = None
    ) -> list[ClientResult]:
        results = []
        encoded: dict[int, bytes] = {}  # the broadcast is encoded once per distinct params object
        decoded: dict[int, NamedTensors] = {}  # and decoded once: clients only read it
        arrived = []
        for task in tasks:
            key = id(task.params)
            if key not in encoded:
                encoded[key] = wire.encode(task.params)
                decoded[key] = wire.decode(encoded[key])
            arrived.append((replace(task, params=decoded[key]), len(encoded[key])))
        group = len(arrived) if isinstance(self.trainer, VectorizedTrainer) else 1
        for start in range(0, len(arrived), group):
            chunk = arrived[start:start + group]
            trained = self.trainer.train_many([t for t, _ in chunk])
            for (task, bytes_down), (params, metrics) in zip(chunk, trained):
                result = self._client_turn(task, params, metrics, bytes_down)
                if on_result is not None:
                    on_result(result)
                results.append(result)
        return results

    def _client_turn(self, task: ClientTask, trained: NamedTensors, metrics: dict[str, float],
                     bytes_down: int) -> ClientResult:
        reply = client_reply(task, trained, metrics, self.pipeline, self.client_states.get(task.client_id))
        if reply.state:
            self.client_states[task.client_id] = reply.state
        else:
            self.client_states.pop(task.client_id, None)
        if reply.up is None:
            return ClientResult(client_id=task.client_id, update=None, metrics=reply.metrics, bytes_up=0,
                                bytes_down=bytes_down, error=reply.error)
        return result_from_wire(task.client_id, reply.up, reply.metrics, bytes_down)
