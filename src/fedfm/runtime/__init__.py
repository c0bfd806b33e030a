"""Runtimes: where client work runs."""
