"""Metrics sink, tables and plots, built from run directories alone."""
