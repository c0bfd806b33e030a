"""The `fedfm` command line (typer + rich). Heavy libraries load inside commands only."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from fedfm.errors import FedfmError

app = typer.Typer(help="fedfm: federated adaptation of foundation models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets: list, fetch, and inspect client partitions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
flower_app = typer.Typer(help="Flower deployment: write an experiment's app, start or stop a local cluster.",
                         no_args_is_help=True)
app.add_typer(flower_app, name="flower")
console = Console()
err_console = Console(stderr=True)

SetOpt = typer.Option(None, "--set", "-s", help="Override a config key, e.g. --set federation.rounds=3 (repeatable).")


def _version(value: bool) -> None:
    if value:
        from fedfm import __version__

        console.print(f"fedfm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Federate a foundation model: run experiments, inspect data, report results."""


@app.command("run")
def run_cmd(
    config: Optional[Path] = typer.Argument(None, help="Experiment TOML (default: the built-in default experiment)."),
    set_: Optional[List[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<config>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run an experiment (or resume one) and write its run directory."""
    from fedfm.config import load_config
    from fedfm.errors import ConfigError
    from fedfm import runner

    if resume is not None:
        if config is not None or set_:
            raise ConfigError("--resume continues a run with its saved config; do not pass CONFIG or --set with it")
        target = resume
    else:
        cfg = load_config(config, set_ or [])
        stem = config.stem if config else "default"
        target = out or Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"[bold]fedfm[/] {'resuming' if resume else 'run'} -> {target}")
    with _Progress(quiet) as progress:
        if resume is not None:
            summary = runner.resume(target, progress.callbacks())
        else:
            summary = runner.run(cfg, target, progress.callbacks())
    _print_summary(summary, target)


@app.command("compare")
def compare_cmd(
    config: Path = typer.Argument(..., help="Experiment TOML with public and private data and a schedule."),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds 0..N-1 per paradigm."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (table.md, table.csv, PNG plots, runs)."),
    set_: Optional[List[str]] = SetOpt,
    paradigms: str = typer.Option("central,fl,ffm,pooled", "--paradigms", help="Comma-separated subset to run."),
) -> None:
    """Compare central (public only), fl (private via FL), ffm (the schedule) and pooled (all data
    centralized) on the same data, seeds and compute budget. Interrupted compares resume."""
    from fedfm.compare import PARADIGMS, run_compare
    from fedfm.config import load_config
    from fedfm.errors import ConfigError

    chosen = [p.strip() for p in paradigms.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PARADIGMS]
    if bad or not chosen:
        raise ConfigError(f"--paradigms {paradigms!r}: unknown {bad}; allowed: {', '.join(PARADIGMS)}")
    cfg = load_config(config, set_ or [])
    with _Progress(quiet=False) as progress:
        run_compare(cfg, list(range(seeds)), out, chosen, callbacks=progress.callbacks())
    console.print((out / "table.md").read_text())
    console.print(f"wrote {out / 'table.md'}, {out / 'table.csv'} and plots in {out}")


@app.command("sweep")
def sweep_cmd(
    config: Optional[Path] = typer.Argument(None, help="Experiment TOML (default: the default experiment)."),
    grid: List[str] = typer.Option(..., "--grid", "-g", help="key=v1,v2,... (repeatable; the grid is their product)."),
    seeds: int = typer.Option(1, "--seeds", min=1),
    out: Path = typer.Option(..., "--out", "-o"),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Run a grid over config keys (e.g. the adaptive policy's threshold and window) and tabulate it."""
    from fedfm.sweep import run_sweep

    with _Progress(quiet=False) as progress:
        run_sweep(config, set_ or [], grid, list(range(seeds)), out, callbacks=progress.callbacks())
    console.print((out / "sweep.md").read_text())


@app.command("report")
def report_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories to compare."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write report.md/report.csv/report.png."),
) -> None:
    """Table and plots comparing finished (or partial) runs, from their run directories alone."""
    from fedfm.report.tables import build_report

    table, written = build_report(run_dirs, out)
    console.print(table)
    for path in written:
        console.print(f"wrote {path}")


@app.command("models")
def models_cmd() -> None:
    """List model presets (any local HF model directory, or a hub id when online, also works)."""
    from rich.table import Table

    from fedfm.models.presets import PRESETS

    table = Table("preset", "description")
    for name in PRESETS.names():
        table.add_row(name, PRESETS.get(name).description)
    console.print(table)


@data_app.command("list")
def data_list() -> None:
    """List bundled datasets (local .csv/.json/.jsonl/.parquet files and hf:ORG/NAME also work)."""
    from rich.table import Table

    from fedfm.data.sources import BUNDLED

    table = Table("dataset", "description")
    for name in BUNDLED.names():
        table.add_row(name, BUNDLED.get(name).description)
    console.print(table)


@data_app.command("fetch")
def data_fetch(names: List[str] = typer.Argument(..., help="Bundled dataset names.")) -> None:
    """Download, verify (sha256) and cache bundled datasets and corpora."""
    from fedfm.data.corpora import FETCHERS
    from fedfm.data.sources import BUNDLED
    from fedfm.errors import DataError

    for name in names:
        if name in BUNDLED:
            path = BUNDLED.get(name).fetch()
        elif name in FETCHERS:
            path = FETCHERS[name]()
        else:
            known = sorted(set(BUNDLED.names()) | set(FETCHERS))
            raise DataError(f"unknown dataset {name!r}; allowed: {', '.join(known)}")
        console.print(f"{name}: {path if isinstance(path, Path) else path[0].parent}")


@data_app.command("show")
def data_show(
    config: Optional[Path] = typer.Argument(None, help="Experiment TOML (default: the default experiment)."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Per-client sizes and label histograms of an experiment's partition."""
    from rich.table import Table

    from fedfm.config import load_config
    from fedfm.experiment import prepare_data

    cfg = load_config(config, set_ or [])
    roles = prepare_data(cfg)
    labels, names = roles.pool.labels, roles.label_names
    table = Table("client", "examples", *names, "validation",
                  title=f"{cfg.private_data}: {cfg.partition.method} partition over {cfg.federation.clients} clients")

    def hist(idx: Any) -> list[str]:
        return [str(int((labels[idx] == k).sum())) for k in range(len(names))]

    for c, idx in enumerate(roles.train):
        table.add_row(str(c), str(len(idx)), *hist(idx), str(len(roles.val[c])))
    if roles.public is not None:
        table.add_row("public (server)", str(len(roles.public)), *hist(roles.public), "", style="cyan")
    table.add_row("test", str(len(roles.test)), *hist(roles.test), "", style="bold")
    console.print(table)


@app.command("audit")
def audit_cmd(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    client: int = typer.Option(0, "--client", help="The client whose next update the server inverts."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Examples in that client's step."),
    iterations: int = typer.Option(300, "--iterations", min=1, help="Optimisation steps of the inversion."),
    members: int = typer.Option(400, "--members", min=10, help="Members and non-members sampled for membership inference."),
) -> None:
    """Measure what a run leaks: membership inference on the final model, and gradient inversion of
    a client's update as the server sees it under the run's defenses. Writes RUN_DIR/audit.json."""
    from fedfm.audits.run import audit_run, format_report

    with console.status("auditing"):
        report = audit_run(run_dir, client=client, batch_size=batch_size, iterations=iterations, members=members)
    console.print(format_report(report), highlight=False)
    console.print(f"written to {run_dir / 'audit.json'}")


DEFAULT_CLUSTER = Path("runs") / "flower-cluster"


@flower_app.command("app")
def flower_app_cmd(
    config: Optional[Path] = typer.Argument(None, help="Experiment TOML (default: the built-in default experiment)."),
    set_: Optional[List[str]] = SetOpt,
    out: Path = typer.Option(Path("flower-app"), "--out", "-o", help="Directory to write the Flower app into."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where the ServerApp writes the run "
                                           "(a path on the SuperLink's machine; default: runs/<config>-flower)."),
) -> None:
    """Write a runnable Flower app (pyproject.toml) for an experiment; submit it with `flwr run`."""
    from fedfm.config import load_config, to_toml
    from fedfm.runtime.flower.deploy import write_app

    cfg = load_config(config, set_ or [])
    target = run_dir or Path("runs") / f"{config.stem if config else 'default'}-flower"
    write_app(to_toml(cfg), target, out)
    console.print(f"wrote the Flower app to {out}/pyproject.toml (run directory {target.resolve()}).\n"
                  f"Submit it with: flwr run {out} <connection>   (fedfm must be installed on the SuperLink "
                  "and every SuperNode)")


@flower_app.command("up")
def flower_up_cmd(
    nodes: int = typer.Option(3, "--nodes", "-n", min=1, help="SuperNodes to start (partitions 0..N-1)."),
    tls: bool = typer.Option(False, "--tls", help="Serve TLS with a throwaway CA (written to STATE/tls)."),
    auth: bool = typer.Option(False, "--auth", help="Require registered SuperNode keys (implies --tls)."),
    state: Path = typer.Option(DEFAULT_CLUSTER, "--state", help="Directory for the cluster's state, logs and keys."),
) -> None:
    """Start a SuperLink and N SuperNodes on loopback (real processes, real network) and wait for them."""
    from fedfm.runtime.flower import deploy

    with console.status(f"starting a SuperLink and {nodes} SuperNodes"):
        cluster = deploy.up(state, nodes, tls=tls, auth=auth)
    lines = [f"SuperLink at {cluster.address} with {nodes} SuperNodes online (state in {cluster.state_dir}).",
             "Run an experiment on it with:",
             f"  fedfm run CONFIG --set runtime.name=\"flower\" --set runtime.address=\"{cluster.address}\""
             + (f" --set runtime.tls.ca=\"{cluster.tls['ca']}\"" if cluster.tls else ""),
             f"Stop it with: fedfm flower down --state {state}"]
    console.print("\n".join(lines), highlight=False)


@flower_app.command("down")
def flower_down_cmd(
    state: Path = typer.Option(DEFAULT_CLUSTER, "--state", help="The directory `fedfm flower up` used."),
) -> None:
    """Stop exactly the processes `fedfm flower up` started."""
    from fedfm.runtime.flower import deploy

    stopped = deploy.down(state)
    console.print(f"stopped {len(stopped)} processes" if stopped else f"no cluster running from {state}")


class _Progress:
    """Rich progress bars over rounds and over the clients of the current round."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                                 disable=quiet)
        self.rounds: Any = None
        self.clients: Any = None

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def callbacks(self) -> Any:
        from fedfm.runner import Callbacks

        return Callbacks(on_start=self._start, on_round_start=self._round_start,
                         on_client=self._client, on_round_end=self._round_end)

    def _start(self, first: int, last: Optional[int]) -> None:
        for task in (self.rounds, self.clients):  # a compare or sweep starts one run after another
            if task is not None:
                self.progress.remove_task(task)
        self.rounds = self.progress.add_task("stages", total=last, completed=first - 1, info="")
        self.clients = self.progress.add_task("clients", total=1, info="")

    def _round_start(self, rnd: int, cohort: list[int]) -> None:
        self.progress.reset(self.clients, total=len(cohort), info="")
        self.progress.update(self.clients, description=f"round {rnd} clients")

    def _client(self, result: Any) -> None:
        self.progress.update(self.clients, advance=1, info=f"client {result.client_id} loss {result.metrics.get('train_loss', float('nan')):.3f}")

    def _round_end(self, line: dict) -> None:
        acc = line.get("accuracy")
        info = f"acc {acc:.4f}" if acc is not None else ""
        self.progress.update(self.rounds, advance=1, info=info)
        if self.quiet:
            return
        console.log(f"{line['phase']} stage {line['round']}: train_loss {line['train_loss']:.4f}"
                    + (f", staleness {line['staleness']}" if line.get("staleness") else "")
                    + (f", val_loss {line['val_loss']:.4f}" if line.get("val_loss") is not None else "")
                    + (f", test acc {acc:.4f}, f1 {line['f1']:.4f}" if acc is not None else "")
                    + (f", rejected {len(line['rejected'])}" if line["rejected"] else ""))


def _print_summary(summary: dict, target: Path) -> None:
    acc, f1 = summary.get("accuracy"), summary.get("f1")
    console.print(
        f"[bold green]done[/]: {summary['rounds']} rounds, test accuracy "
        f"{acc:.4f}, macro-F1 {f1:.4f}, up {summary['bytes_up'] / 1e6:.2f} MB, "
        f"down {summary['bytes_down'] / 1e6:.2f} MB, {summary['wall_s']:.1f} s"
        + (f" (simulated {summary['sim_time_s']:.1f} s)" if summary.get("sim_time_s") else "")
        + (f", clients' own data: accuracy {summary['local_accuracy']:.4f}" if summary.get("local_accuracy") else "")
        + f". Outputs in {target}"
        if acc is not None else f"done: outputs in {target}"
    )


def main() -> None:
    """Entry point: user errors become one paragraph and exit code 2, never a traceback."""
    try:
        app()
    except FedfmError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; resume with `fedfm run --resume RUN_DIR` (the last completed round is kept)")
        sys.exit(130)


if __name__ == "__main__":
    main()
