"""Adapters: what trains and what travels (registered by name)."""

from fedfm.adapters import lora, prompt, simple  # noqa: F401  (registration)
from fedfm.adapters.base import ADAPTERS, Adapter

__all__ = ["ADAPTERS", "Adapter"]
