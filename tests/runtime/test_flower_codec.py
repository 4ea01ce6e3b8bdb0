"""fedlora's messages through Flower records: exact, bf16 included."""

import pytest
import torch

pytest.importorskip("flwr")

from fedlora.messages import AdapterState, ClientUpdate, RoundPlan  # noqa: E402
from fedlora.runtime.flower import codec  # noqa: E402


def state(dtype: torch.dtype) -> AdapterState:
    g = torch.Generator().manual_seed(0)
    return AdapterState(
        A={"enc.0.query": torch.randn(4, 8, generator=g).to(dtype)},
        B={"enc.0.query": torch.randn(8, 4, generator=g).to(dtype)},
        head={"classifier.weight": torch.randn(3, 8, generator=g).to(dtype)},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_adapter_state_round_trips_exactly(dtype):
    sent = state(dtype)
    record = codec.state_to_record(sent)
    assert set(record) == {"A/enc.0.query", "B/enc.0.query", "head/classifier.weight"}
    back = codec.record_to_state(record)
    for kind in ("A", "B", "head"):
        for name, tensor in getattr(sent, kind).items():
            got = getattr(back, kind)[name]
            assert got.dtype == dtype and torch.equal(got, tensor)
    assert back.nbytes() == sent.nbytes()


def test_bf16_travels_as_its_16_bits_not_upcast():
    array = codec.tensor_to_array(torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16))
    assert array.dtype == codec.BF16
    assert array.numpy().dtype.itemsize == 2  # two bytes per element on the wire


def test_instruction_and_update_round_trip():
    plan = RoundPlan(round=3, trained="B", train_head=False, method="rolora")
    ins = codec.Instruction(
        config="rank: 4\n",
        label_names=["a", "b"],
        state=state(torch.float32),
        base_delta={"enc.0.query": torch.ones(8, 8)},
        plan=plan,
    )
    back = codec.content_to_instruction(codec.instruction_to_content(ins))
    assert back.plan == plan and back.config == ins.config and back.label_names == ["a", "b"]
    assert torch.equal(back.base_delta["enc.0.query"], torch.ones(8, 8))
    evaluate = codec.content_to_instruction(
        codec.instruction_to_content(codec.Instruction("x: 1\n", ["a"], ins.state, {}, None))
    )
    assert evaluate.plan is None and evaluate.base_delta == {}

    update = ClientUpdate(client_id=2, num_examples=17, B=dict(ins.state.B), train_loss=0.5)
    got = codec.content_to_update(codec.update_to_content(update))
    assert (got.client_id, got.num_examples, got.train_loss) == (2, 17, 0.5)
    assert (
        got.A == {}
        and got.head == {}
        and torch.equal(got.B["enc.0.query"], update.B["enc.0.query"])
    )
    assert got.nbytes() == update.nbytes()


def test_a_config_is_checked_on_arrival_and_round_trips():
    from fedlora.config import load_config
    from fedlora.errors import FedLoraError

    cfg = load_config(
        None, ["method=schedule", "schedule=[{method: fra, rounds: 2}, {method: ffa}]"]
    )
    assert codec.text_to_config(codec.config_to_text(cfg)) == cfg
    bad = cfg.replace(method="fedavg", client_ranks=[2, 4, 8])  # only the methods refuse it
    with pytest.raises(FedLoraError, match="needs a method with per-client ranks"):
        codec.text_to_config(codec.config_to_text(bad))
