"""Runtime extension point: move tasks to clients and results back, nothing else."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from fedfm.types import ClientResult, ClientTask


class Runtime(Protocol):
    def run(
        self, tasks: Sequence[ClientTask],
        on_result: "Optional[Callable[[ClientResult], Optional[ClientResult]]]" = None,
    ) -> list[ClientResult]:
        """Deliver each task to its client and return the results in task order.

        ``on_result`` is called with each result as it arrives. If it returns a ClientResult, the
        runtime keeps that one instead: the round's streaming mean folds an update into its sum and
        hands back the result without its payload, so a round never holds every client's update.
        Such rounds are used only with runtimes whose class sets ``streams_results = True``: they
        hand each result over as it arrives and never change it afterwards."""
        ...
