"""Flower runtimes (optional extra ``fedfm[flower]``): the same experiment on Flower's simulation
engine or a Flower deployment. Importing this package imports flwr; nothing else in fedfm does."""
