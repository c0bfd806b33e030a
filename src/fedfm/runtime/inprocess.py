"""The default runtime: every client runs in this process, one after another, on one
shared model. Tasks and payloads still go through the wire encoding, so the bytes
reported are the bytes a deployment would move."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from fedfm import wire
from fedfm.pipeline import UpdatePipeline
from fedfm.runtime.client import result_from_wire, train_client
from fedfm.trainers.base import ClientTrainer
from fedfm.types import ClientResult, ClientTask

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
        for task in tasks:
            down = encoded.setdefault(id(task.params), wire.encode(task.params))
            result = self._client_turn(replace(task, params=wire.decode(down)), len(down))
            if on_result is not None:
                on_result(result)
            results.append(result)
        return results

    def _client_turn(self, task: ClientTask, bytes_down: int) -> ClientResult:
        reply = train_client(self.trainer, task, self.pipeline, self.client_states.get(task.client_id))
        if reply.state:
            self.client_states[task.client_id] = reply.state
        else:
            self.client_states.pop(task.client_id, None)
        if reply.up is None:
            return ClientResult(client_id=task.client_id, update=None, metrics=reply.metrics, bytes_up=0,
                                bytes_down=bytes_down, error=reply.error)
        return result_from_wire(task.client_id, reply.up, reply.metrics, bytes_down)
