"""Federated optimization algorithms (registered by name)."""

from fedfm.algorithms import fedavg, fedopt, fedprox  # noqa: F401  (registration)
from fedfm.algorithms.base import ALGORITHMS, Algorithm, build_algorithm

__all__ = ["ALGORITHMS", "Algorithm", "build_algorithm"]
