"""Runtime extension point: move tasks to clients and results back, nothing else."""

from __future__ import annotations

from typing import Callable, Optional, Protocol, Sequence

from fedfm.types import ClientResult, ClientTask


class Runtime(Protocol):
    def run(
        self, tasks: Sequence[ClientTask], on_result: Optional[Callable[[ClientResult], None]] = None
    ) -> list[ClientResult]:
        """Deliver each task to its client and return the results in task order."""
        ...
