"""RoLoRA Table 6: upload per client per round from RoBERTa-Large's config, against a hand
computation from the layer shapes."""

import pytest

from fedlora.reproduce.upload import lora_shapes, roberta_large_config, upload_per_round

HIDDEN, BLOCKS = 1024, 24  # RoBERTa-Large: query and value are 1024 x 1024 in all 24 blocks


@pytest.fixture(scope="module")
def config():
    return roberta_large_config()


def test_shapes_are_roberta_large(config):
    shapes = lora_shapes(config, target_modules=["query", "value"])
    assert len(shapes) == 2 * BLOCKS
    assert set(shapes.values()) == {(HIDDEN, HIDDEN)}


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_upload_equals_hand_computation(config, rank):
    a_params = rank * HIDDEN  # A: (r, in)
    b_params = HIDDEN * rank  # B: (out, r)
    lora_layers = 2 * BLOCKS
    fedavg = upload_per_round(config, method="fedavg", rank=rank)
    assert fedavg.parameters == (lora_layers * (a_params + b_params),)
    assert fedavg.mean_bytes == lora_layers * (a_params + b_params) * 4  # float32
    assert upload_per_round(config, method="ffa", rank=rank).parameters == (lora_layers * b_params,)
    assert upload_per_round(config, method="rolora", rank=rank).parameters == (
        lora_layers * b_params,  # odd rounds: B
        lora_layers * a_params,  # even rounds: A
    )
    assert fedavg.parameters[0] == 98_304 * rank


def test_half_the_layers_is_the_same_message_size(config):
    """Table 3's premise: FedAvg-LoRA on 12 blocks uploads what FFA-LoRA does on 24."""
    half = upload_per_round(config, method="fedavg", rank=4, layers=list(range(12, 24)))
    assert half.layers == BLOCKS
    assert half.parameters == upload_per_round(config, method="ffa", rank=4).parameters


def test_cli_counts_a_block_range(capsys):
    """RoLoRA's layer set P2 for SST-2 (blocks 18-23): 12 LoRA layers, rank 1."""
    from fedlora.cli import main

    assert main(["experiment", "upload", "--layers", "18-23"]) == 0
    table = capsys.readouterr().out
    assert f"| fedavg | 1 | 12 | {12 * 2 * HIDDEN:,} |" in table
    assert f"| rolora | 1 | 12 | {12 * HIDDEN:,} |" in table


def test_cli_refuses_blocks_the_model_lacks(capsys):
    from fedlora.cli import main

    assert main(["experiment", "upload", "--layers", "20-30"]) != 0
    err = capsys.readouterr().err
    assert "no block [24, 25, 26, 27, 28, 29, 30]" in err
    with pytest.raises(SystemExit):
        main(["experiment", "upload", "--layers", "18-x"])
