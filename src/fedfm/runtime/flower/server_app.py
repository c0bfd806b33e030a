"""fedfm's server loop as a Flower ServerApp.

The whole fedfm run (schedule, central stages, rounds, evaluation, checkpoints, reports) runs
here unchanged; only the runtime differs: a `GridRuntime` that sends each round's tasks to the
SuperNodes through Flower's Grid. A run directory that already holds a run is resumed from its
last checkpoint, so restarting the ServerApp after a crash continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedfm.runtime.flower import codec

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context)


def serve(grid: Grid, context: Context, callbacks: "object | None" = None) -> None:
    """Run, or resume from its last checkpoint, the experiment in ``context``'s run config."""
    from fedfm import runner
    from fedfm.config import loads_config
    from fedfm.runtime.flower.grid_runtime import GridRuntime

    text, out = codec.run_config_of(context)
    cfg = loads_config(text)
    rt = cfg.runtime
    runtime = GridRuntime(grid, round_timeout=rt.round_timeout,
                          min_clients=rt.min_clients or cfg.federation.clients_per_round)
    path = Path(out)
    if (path / "config.toml").is_file():
        runner.resume(path, callbacks, runtime=runtime)  # type: ignore[arg-type]
    else:
        runner.run(cfg, path, callbacks, runtime=runtime)  # type: ignore[arg-type]
