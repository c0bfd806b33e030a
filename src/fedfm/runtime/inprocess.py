"""The default runtime: every client runs in this process, one after another (or a cohort at a
time, vectorised), on one shared model. The broadcast and each client's payload are handed over
as they are, and their bytes are counted exactly as ``wire.encode`` would write them
(``wire.encoded_size``), so the bytes reported are the bytes a deployment moves, without
serializing anything in memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from fedfm import wire
from fedfm.pipeline import UpdatePipeline
from fedfm.runtime.client import client_step, download_bytes, with_client_state
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

    streams_results = True
    """Each result goes to ``on_result`` as its client finishes, and the runtime keeps what it
    returns: a round may sum updates as they arrive (fedfm.round.MeanStream)."""

    def run(
        self, tasks: Sequence[ClientTask],
        on_result: "Optional[Callable[[ClientResult], Optional[ClientResult]]]" = None,
    ) -> list[ClientResult]:
        results = []
        # The broadcast is what the server holds: clients read the server's own tensors (a wire
        # round trip is lossless, so a decoded copy would be equal, bit for bit, and would cost a
        # copy of every trainable parameter per round). Its bytes are counted exactly as
        # wire.encode would write them. Clients only read it, and that is checked: torch counts
        # in-place writes on every tensor (its version), so a client that wrote into the server's
        # params is an error, not silent corruption.
        sizes: dict[int, int] = {}
        versions: list[tuple[NamedTensors, list[int]]] = []
        arrived = []
        for task in tasks:
            key = id(task.params)
            if key not in sizes:
                sizes[key] = wire.encoded_size(task.params)
                versions.append((task.params, [v._version for v in task.params.values()]))
            state = self.client_states.get(task.client_id)
            arrived.append((with_client_state(task, self.trainer, state), download_bytes(task, sizes[key])))
        group = len(arrived) if isinstance(self.trainer, VectorizedTrainer) else 1
        for start in range(0, len(arrived), group):
            chunk = arrived[start:start + group]
            trained = self.trainer.train_many([t for t, _ in chunk])
            for (task, bytes_down), (params, metrics) in zip(chunk, trained):
                result = self._client_turn(task, params, metrics, bytes_down)
                if on_result is not None:
                    returned = on_result(result)
                    result = returned if isinstance(returned, ClientResult) else result
                results.append(result)
        for params, before in versions:
            written = [k for (k, v), b in zip(params.items(), before) if v._version != b]
            if written:
                raise RuntimeError(f"a client wrote into the broadcast params in place ({', '.join(written[:3])}); "
                                   "clients must copy what they change (ModelHandle.set_params copies into the model)")
        return results

    @property
    def _algorithm(self) -> Any:
        return getattr(self.trainer, "algorithm", None)

    def _client_turn(self, task: ClientTask, trained: NamedTensors, metrics: dict[str, float],
                     bytes_down: int) -> ClientResult:
        out, state = client_step(task, trained, self.pipeline, self.client_states.get(task.client_id),
                                 self._algorithm, metrics)
        if state:
            self.client_states[task.client_id] = state
        else:
            self.client_states.pop(task.client_id, None)
        if out.payload is None:
            return ClientResult(client_id=task.client_id, update=None, metrics=dict(metrics), bytes_up=0,
                                bytes_down=bytes_down, error=out.error)
        # Nothing crosses a process here: the payload is handed over as is, and its bytes are
        # what wire.encode would write, counted exactly from its header and data sizes.
        payload = {k: v.detach() for k, v in out.payload.items()}
        return ClientResult(client_id=task.client_id, update=None, metrics={**metrics, **out.metrics},
                            bytes_up=wire.encoded_size(payload), bytes_down=bytes_down, payload=payload)
