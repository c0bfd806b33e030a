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
