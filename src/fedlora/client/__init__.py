"""What a client does: local LoRA training on its own data, and evaluation."""

from fedlora.client.evaluate import evaluate, evaluate_causal, evaluate_split
from fedlora.client.train import LocalTraining, train_client

__all__ = ["LocalTraining", "evaluate", "evaluate_causal", "evaluate_split", "train_client"]
