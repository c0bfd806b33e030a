"""Aggregation rules (registered by name)."""

from fedfm.aggregators import mean, robust  # noqa: F401  (registration)
from fedfm.aggregators.base import AGGREGATORS, Aggregator, build_aggregator

__all__ = ["AGGREGATORS", "Aggregator", "build_aggregator"]
