"""FedSA-LoRA (Guo et al., ICLR 2025): the server averages A only; B, the head (and DoRA's
magnitude) stay with each client. Math against a float64 reference, the invariants, and a
real client reply that carries no B."""

from __future__ import annotations

import pytest
import torch

from fedlora import aggregation
from fedlora.client import LocalTraining, train_client
from fedlora.client.state import ClientStore, shared_part, with_private
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import build_method
from fedlora.runtime.flower import codec

LAYERS = {"l0": (6, 5), "l1": (4, 7)}  # out, in
RANK = 3
SCALING = 2.0


def random_state(seed: int, *, magnitude: bool = False) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return AdapterState(
        A={k: torch.randn(RANK, i, generator=g, dtype=f64) for k, (o, i) in LAYERS.items()},
        B={k: torch.randn(o, RANK, generator=g, dtype=f64) for k, (o, i) in LAYERS.items()},
        head={"classifier.weight": torch.randn(2, 5, generator=g, dtype=f64)},
        magnitude=(
            {k: torch.rand(o, generator=g, dtype=f64) for k, (o, i) in LAYERS.items()}
            if magnitude
            else {}
        ),
    )


def reply(cid: int, trained: AdapterState, n: int) -> ClientUpdate:
    """What a FedSA-LoRA client sends: its A only."""
    return ClientUpdate(client_id=cid, num_examples=n, A=dict(trained.A))


def aggregate(updates, state, weights=None):
    method = build_method("fedsa", load_config(None, ["method=fedsa"]))
    weights = weights if weights is not None else [float(u.num_examples) for u in updates]
    return method.aggregate(
        plan=method.plan(1),
        state=state,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, SCALING),
    )


def test_declares_what_stays_with_the_clients():
    method = build_method("fedsa", load_config(None, ["method=fedsa"]))
    assert method.private == ("B", "head", "magnitude")
    assert method.plan(1).trained == "AB" and method.paper_weighting == "num_examples"


def test_shared_a_is_the_example_weighted_mean_float64_reference():
    """A = sum_k (n_k / n) A_k, written densely here (stacked, one einsum): the method's
    aggregate and aggregation.fedsa agree with it; B, head and magnitude stay put."""
    start = random_state(0, magnitude=True)
    clients = [random_state(k + 1) for k in range(3)]
    n = [3, 5, 12]
    result = aggregate([reply(k, s, n[k]) for k, s in enumerate(clients)], start)
    w = torch.tensor(n, dtype=torch.float64) / sum(n)
    for layer in LAYERS:
        stacked = torch.stack([s.A[layer] for s in clients])  # (K, r, in)
        reference = torch.einsum("k,kri->ri", w, stacked)
        torch.testing.assert_close(result.state.A[layer], reference, rtol=0, atol=1e-14)
        torch.testing.assert_close(
            aggregation.fedsa([s.A[layer] for s in clients], n), reference, rtol=0, atol=1e-14
        )
        assert result.state.A[layer].dtype == torch.float64
        assert torch.equal(result.state.B[layer], start.B[layer])
        assert torch.equal(result.state.magnitude[layer], start.magnitude[layer])
    assert torch.equal(result.state.head["classifier.weight"], start.head["classifier.weight"])
    assert result.base_delta == {} and result.delta_bytes == 0


def test_identical_clients_are_a_fixed_point_of_each_clients_own_model():
    """All clients send the same A: the shared A is it, and each client's own model after
    the round, s B_k A, is exactly the update it proposed, s B_k A_k."""
    start, trained = random_state(0), random_state(1)
    own_B = [random_state(10 + k).B for k in range(3)]
    result = aggregate([reply(k, trained, 4 + k) for k in range(3)], start)
    for layer in LAYERS:
        torch.testing.assert_close(result.state.A[layer], trained.A[layer], rtol=0, atol=1e-15)
        for B in own_B:
            torch.testing.assert_close(
                aggregation.personal_increment(result.state.A[layer], B[layer], scaling=SCALING),
                SCALING * B[layer] @ trained.A[layer],
            )


def test_client_order_does_not_matter():
    start = random_state(0)
    ups = [reply(k, random_state(k + 1), 5 + 3 * k) for k in range(4)]
    forward, backward = aggregate(ups, start), aggregate(ups[::-1], start)
    for layer in LAYERS:
        torch.testing.assert_close(
            forward.state.A[layer], backward.state.A[layer], rtol=0, atol=1e-14
        )


def test_uniform_weighting_is_the_plain_mean():
    start = random_state(0)
    clients = [random_state(k + 1) for k in range(3)]
    result = aggregate([reply(k, s, 10 * k + 1) for k, s in enumerate(clients)], start, [1.0] * 3)
    for layer in LAYERS:
        expect = sum(s.A[layer] for s in clients) / 3
        torch.testing.assert_close(result.state.A[layer], expect, rtol=0, atol=1e-14)


def test_only_a_leaves_a_real_client(tiny_overrides):
    """A client trained through its store (tiny BERT): the reply, and the Flower message
    made of it, hold A and nothing else; its upload is A's bytes; B and the head it
    trained are in its store, and differ from where it started."""
    cfg = load_config(None, [*tiny_overrides, "method=fedsa"])
    fed = build_federation(cfg, log=silent)
    method = build_method("fedsa", cfg)
    store = ClientStore(fed.initial_state, private=method.private)
    sent_to_client = shared_part(fed.initial_state, method.private)
    update = store.trainer(train_client)(
        adapter=fed.adapter,
        state=sent_to_client,
        data=fed.encoded[0].train,
        plan=method.plan(1),
        settings=LocalTraining.from_config(cfg),
        client_id=0,
        seed=cfg.seed,
    )
    assert update.B == {} and update.head == {} and update.magnitude == {}
    assert update.A.keys() == fed.initial_state.A.keys()
    a_bytes = sum(t.numel() * t.element_size() for t in fed.initial_state.A.values())
    assert update.nbytes() == a_bytes
    record = codec.update_to_content(update).array_records["update"]  # what Flower sends
    assert sorted(record) == sorted(f"A/{layer}" for layer in fed.initial_state.A)
    kept = store.get(0)
    for layer, B0 in fed.initial_state.B.items():
        assert not torch.equal(kept.B[layer], B0)
    for name, h0 in fed.initial_state.head.items():
        assert not torch.equal(kept.head[name], h0)
    assert kept.A == {}
    # its own model: the global A it was sent (unchanged here) with its own B and head
    own = with_private(sent_to_client, kept)
    assert own.A.keys() == own.B.keys() == fed.initial_state.A.keys()


@pytest.mark.parametrize("key", ["method=fedsa", "methods=[fedavg,fedsa]"])
def test_fedsa_is_a_valid_method(key):
    cfg = load_config(None, [key])
    assert "fedsa" in {cfg.method, *cfg.methods}
