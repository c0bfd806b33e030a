"""ClientTrainer extension point: local training of one or many clients.

``train_many`` is the unit of work a runtime hands a trainer, so a vectorised trainer
can train many clients' adapters in one batched call; the plain trainer loops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from fedfm.types import ClientTask


class ClientTrainer(Protocol):
    def train_many(self, tasks: "Sequence[ClientTask]") -> "list[tuple[dict[str, torch.Tensor], dict[str, float]]]":
        """For each task: (trained params, metrics incl. train_loss, steps, num_examples).

        The trained params must be fresh tensors that nothing else holds (copies, as
        ModelHandle.get_params makes): the client's turn turns them into the delta in place
        (fedfm.runtime.client.delta_in_place). Returning the model's own parameters, or one
        tensor under two names, would be overwritten."""
        ...
