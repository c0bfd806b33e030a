"""Federated optimization algorithms (registered by name)."""

from fedfm.algorithms import fedavg, fednova, fedopt, fedprox, scaffold  # noqa: F401  (registration)
from fedfm.algorithms.base import ALGORITHMS, Algorithm, build_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm"]
