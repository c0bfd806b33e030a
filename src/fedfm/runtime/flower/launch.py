"""Run an experiment on Flower: ``runtime.name = "flower-sim"`` (Flower's simulation engine, Ray)
or ``"flower"`` (a deployment: a SuperLink with SuperNodes, reached at ``runtime.address``).

Both run fedfm's ServerApp, whose main loop is fedfm's own runner with a `GridRuntime`, and
fedfm's ClientApp; only where they run differs. The run directory is the same as in-process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from fedfm.config import ExperimentConfig, to_toml
from fedfm.errors import ConfigError, FedfmError

from fedfm.runtime.flower.codec import SIM_CONFIG_ENV as CONFIG_ENV  # noqa: E402

# Flower's ``run_simulation`` gives apps an empty run config, so the launcher passes the experiment
# config to simulated ClientApps through the environment, which Ray's workers inherit.


def launch(cfg: ExperimentConfig, out: Path, callbacks: Optional[Any] = None) -> dict[str, Any]:
    """Run (or resume, if ``out`` holds a run) ``cfg`` on its Flower runtime; returns the summary."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError(f"runtime.name={cfg.runtime.name!r} needs Flower: pip install 'fedfm[flower]' "
                          "(and 'fedfm[flower-sim]' for the simulation engine)") from None
    if cfg.runtime.name == "flower-sim":
        return _simulate(cfg, out, callbacks)
    if cfg.runtime.name == "flower":
        return _deploy(cfg, out)
    raise ConfigError(f"runtime.name={cfg.runtime.name!r} is not a Flower runtime (flower-sim, flower)")


def _simulate(cfg: ExperimentConfig, out: Path, callbacks: Optional[Any]) -> dict[str, Any]:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("runtime.name='flower-sim' runs on Ray: pip install 'fedfm[flower-sim]'") from None
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedfm import runner
    from fedfm.runtime.flower.client_app import app as client_app
    from fedfm.runtime.flower.grid_runtime import GridRuntime

    rt = cfg.runtime
    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:  # runs in this process, so callbacks reach the CLI
        runtime = GridRuntime(grid, round_timeout=rt.round_timeout,
                              min_clients=rt.min_clients or cfg.federation.clients_per_round)
        try:
            if (out / "config.toml").is_file():
                outcome["summary"] = runner.resume(out, callbacks, runtime=runtime)
            else:
                outcome["summary"] = runner.run(cfg, out, callbacks, runtime=runtime)
        except BaseException as e:  # Flower logs and swallows ServerApp errors; re-raise them here
            outcome["error"] = e
            raise

    os.environ[CONFIG_ENV] = to_toml(cfg)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # one Ray actor per CPU, but never more than a round can use: each built actor holds its own
    # copy of the model and libraries (~1.1 GB for MiniLM-L6)
    cpus = max(1, min(os.cpu_count() or 1, cfg.federation.clients_per_round))
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}}
    try:
        run_simulation(server_app=server, client_app=client_app, num_supernodes=cfg.federation.clients,
                       backend_config=backend)
    finally:
        os.environ.pop(CONFIG_ENV, None)
    if "error" in outcome:
        raise outcome["error"]
    if "summary" not in outcome:
        raise FedfmError("Flower's simulation ended without running the experiment; see the log above")
    return dict(outcome["summary"])


def _deploy(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    from fedfm.runtime.flower import deploy

    rt = cfg.runtime
    if rt.tls.ca is not None and not Path(rt.tls.ca).is_file():
        raise ConfigError(f"runtime.tls.ca={rt.tls.ca!r} does not exist; give the CA certificate that signed "
                          "the SuperLink's certificate (`fedfm flower up --tls` prints it)")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    app_dir = deploy.write_app(to_toml(cfg), out, out / "flower-app")
    home = out / "flwr-home"
    deploy.write_connection(home, rt.address, Path(rt.tls.ca) if rt.tls.ca else None)
    if rt.auth.enabled:
        keys = sorted(Path(str(rt.auth.keys_dir)).glob("*.pub"))
        if not keys:
            raise ConfigError(f"runtime.auth.keys_dir={rt.auth.keys_dir!r} holds no *.pub SuperNode keys")
        for pub in keys:
            try:
                deploy.register_node(pub, home)
            except FedfmError as e:
                if "already in use" not in str(e):
                    raise
    from fedfm.runner import planned_stages

    deploy.submit(app_dir, home, timeout=(planned_stages(cfg) or 100) * rt.round_timeout + 600)
    summary = out / "summary.json"
    if not summary.is_file():
        raise FedfmError(f"the Flower run finished but wrote no {summary}; is {out} on the SuperLink's machine?")
    return dict(json.loads(summary.read_text()))
