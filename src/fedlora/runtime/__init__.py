"""Runtimes move messages between clients and the server; they implement no method."""

from fedlora.runtime.inprocess import evaluate_global, run_federated, sample_clients

__all__ = ["evaluate_global", "run_federated", "sample_clients"]
