"""Sweep grid parsing and expansion."""

from __future__ import annotations

import pytest

from fedfm.errors import ConfigError
from fedfm.sweep import combos, parse_grid


def test_parse_and_product():
    grid = parse_grid(["schedule.threshold=0.01,0.05", 'adapter.targets=["query"],["query","value"]', "algorithm.name=fedavg,fedprox"])
    assert grid[0] == ("schedule.threshold", [0.01, 0.05])
    assert grid[1][1] == [["query"], ["query", "value"]]
    assert grid[2][1] == ["fedavg", "fedprox"]
    assert len(combos(grid)) == 8


def test_bad_grid_item():
    with pytest.raises(ConfigError, match="key=v1,v2"):
        parse_grid(["schedule.threshold"])


def test_table_has_mean_std_per_cell_and_only_the_metrics_runs_have(tmp_path):
    import json

    from fedfm.sweep import run_sweep

    def fake_run(cfg, out):  # a summary whose numbers follow from the config, to check the table
        out.mkdir(parents=True)
        acc = cfg.aggregator.trim + cfg.seed / 10
        (out / "summary.json").write_text(json.dumps({
            "rounds": 2, "accuracy": acc, "f1": acc, "loss": 1.0, "bytes_up": 1e6, "bytes_down": 1e6,
            "wall_s": 1.0, "backdoor_success": 0.5, "epsilon": None, "perplexity": None}))

    rows = run_sweep(None, ['aggregator.name="trimmed-mean"'], ["aggregator.trim=0.1,0.2"], [0, 1], tmp_path,
                     run_one=fake_run)
    assert [round(r["accuracy_mean"], 6) for r in rows] == [0.15, 0.25]
    assert round(rows[0]["accuracy_std"], 6) == round((0.005) ** 0.5, 6)  # stdev of {0.1, 0.2}
    header = (tmp_path / "sweep.md").read_text().splitlines()[0]
    assert "backdoor_success" in header and "epsilon" not in header and "perplexity" not in header
