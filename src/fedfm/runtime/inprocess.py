"""The default runtime: every client runs in this process, one after another, on one
shared model. Tasks and updates still go through the wire encoding, so the bytes
reported are the bytes a deployment would move."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

from fedfm import wire
from fedfm.runtime.client import result_from_wire, train_client
from fedfm.trainers.base import ClientTrainer
from fedfm.types import ClientResult, ClientTask


@dataclass
class InProcessRuntime:
    trainer: ClientTrainer

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
        up, metrics = train_client(self.trainer, task)
        return result_from_wire(task.client_id, up, metrics, bytes_down)
