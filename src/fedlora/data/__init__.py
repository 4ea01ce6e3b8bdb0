"""Data layer: load labelled text, partition it among clients, tokenise it once."""

from fedlora.data.encode import Encoded, encode, pad_token_id
from fedlora.data.partition import (
    PARTITIONS,
    ClientData,
    ImbalancedPartitioner,
    describe_clients,
    label_histogram,
    partition_clients,
    stratified_split,
    stratified_subsample,
)
from fedlora.data.sources import KNOWN_DATASETS, TextDataset, TextExamples, load_text_dataset

__all__ = [
    "KNOWN_DATASETS",
    "PARTITIONS",
    "ClientData",
    "Encoded",
    "ImbalancedPartitioner",
    "TextDataset",
    "TextExamples",
    "describe_clients",
    "encode",
    "label_histogram",
    "load_text_dataset",
    "pad_token_id",
    "partition_clients",
    "stratified_split",
    "stratified_subsample",
]
