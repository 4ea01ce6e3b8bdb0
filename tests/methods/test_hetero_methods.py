"""FlexLoRA and HetLoRA: clients of different ranks, against dense float64 references."""

import dataclasses
import json

import pytest
import torch

from fedlora import aggregation
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, ClientUpdate
from fedlora.methods import build_method
from fedlora.methods.base import update_error
from fedlora.methods.flexlora import rank_scaling
from fedlora.outputs import RunDir, read_metrics
from fedlora.runtime import run_federated
from fedlora.runtime.checkpoint import load_checkpoint

LAYERS = {"l0": (10, 12), "l1": (8, 9)}  # out, in
ALPHA, RANK, RANKS = 6.0, 3, [2, 3, 5]  # client 2's rank is above the global one
S = ALPHA / RANK  # the global adapter's scaling


def config(method, *extra, ranks=RANKS):
    return load_config(
        None,
        [f"method={method}", f"rank={RANK}", f"alpha={ALPHA}", f"client_ranks={ranks}", *extra],
    )


def client_scaling(r, client_alpha):
    return ALPHA / r if client_alpha == "fixed" else S


def initial_state(seed=0):
    """PEFT's start: random A, B = 0, at the global rank."""
    g = torch.Generator().manual_seed(seed)
    A = {k: torch.randn(RANK, i, generator=g, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    B = {k: torch.zeros(o, RANK, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    return AdapterState(A=A, B=B, head={"w": torch.zeros(2, dtype=torch.float64)})


def random_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = {k: torch.randn(RANK, i, generator=g, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    B = {k: torch.randn(o, RANK, generator=g, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    return AdapterState(A=A, B=B, head={"w": torch.zeros(2, dtype=torch.float64)})


def trained(cid, start, *, seed, client_alpha="fixed", n=10):
    """A reply: the start moved by random steps, at the start's rank, with its scaling."""
    g = torch.Generator().manual_seed(seed)
    r = next(iter(start.A.values())).shape[0]
    return ClientUpdate(
        client_id=cid,
        num_examples=n,
        A={k: a + torch.randn(a.shape, generator=g, dtype=a.dtype) for k, a in start.A.items()},
        B={k: b + torch.randn(b.shape, generator=g, dtype=b.dtype) for k, b in start.B.items()},
        head={"w": torch.full((2,), float(cid), dtype=torch.float64)},
        scaling=dict.fromkeys(LAYERS, client_scaling(r, client_alpha)),
    )


def aggregate(method, plan, state, updates, weights):
    return method.aggregate(
        plan=plan, state=state, updates=updates, weights=weights, scaling=dict.fromkeys(LAYERS, S)
    )


def mean_update(updates, weights, layer):
    """M = sum_k w_k s_k B_k A_k, dense."""
    total = sum(weights)
    return sum(
        w / total * u.scaling[layer] * u.B[layer] @ u.A[layer]
        for w, u in zip(weights, updates, strict=True)
    )


def best_rank(M, r):
    U, sv, Vh = torch.linalg.svd(M)
    return (U[:, :r] * sv[:r]) @ Vh[:r]


def a_round(method, state, clients, *, seed, client_alpha="fixed", round=1, **kwargs):
    plan = method.plan(round)
    starts = {c: method.client_start(state, client_id=c, plan=plan) for c in clients}
    updates = [
        trained(c, starts[c], seed=seed + c, client_alpha=client_alpha, n=5 + c) for c in clients
    ]
    return plan, starts, updates


# -- FlexLoRA --------------------------------------------------------------------------


@pytest.mark.parametrize("client_alpha", ["fixed", "proportional"])
def test_flexlora_sends_each_client_the_best_approximation_at_its_rank(client_alpha):
    method = build_method("flexlora", config("flexlora", f"client_alpha={client_alpha}"))
    state = initial_state()
    plan, starts, updates = a_round(method, state, [0, 1, 2], seed=1, client_alpha=client_alpha)
    for c, start in starts.items():  # round 1: the initial adapter at each client's rank
        for layer in LAYERS:
            assert start.A[layer].shape[0] == RANKS[c]
            assert torch.count_nonzero(start.B[layer]) == 0
    weights = [float(u.num_examples) for u in updates]
    result = aggregate(method, plan, state, updates, weights)
    assert not result.base_delta  # the frozen weights never change
    errors = update_error(
        before=state,
        starts=starts,
        updates=updates,
        weights=weights,
        scaling=dict.fromkeys(LAYERS, S),
        result=result,
    )
    nxt = method.plan(2)
    for layer in LAYERS:
        M = mean_update(updates, weights, layer)
        global_inc = S * result.state.B[layer] @ result.state.A[layer]
        torch.testing.assert_close(global_inc, best_rank(M, RANK), rtol=1e-9, atol=1e-9)
        expected_error = torch.linalg.norm(M - best_rank(M, RANK)) / torch.linalg.norm(M)
        assert errors[layer] == pytest.approx(float(expected_error), rel=1e-7)
        for c, r in enumerate(RANKS):  # r = 5 > rank: from the ranks the server keeps
            start = method.client_start(result.state, client_id=c, plan=nxt)
            s_k = client_scaling(r, client_alpha)
            torch.testing.assert_close(
                s_k * start.B[layer] @ start.A[layer], best_rank(M, r), rtol=1e-9, atol=1e-9
            )


def test_flexlora_clients_proposing_one_increment_are_a_fixed_point_whatever_their_rank():
    method = build_method("flexlora", config("flexlora"))
    g = torch.Generator().manual_seed(7)
    D = {
        k: torch.randn(o, 2, generator=g, dtype=torch.float64)
        @ torch.randn(2, i, generator=g, dtype=torch.float64)
        for k, (o, i) in LAYERS.items()
    }
    updates = []
    for c, r in enumerate(RANKS):  # client c holds D at its own rank and scaling
        s_k = ALPHA / r
        A, B = {}, {}
        for k, d in D.items():
            U, sv, Vh = torch.linalg.svd(d)
            A[k], B[k] = aggregation.zero_pad(Vh[:2], U[:, :2] * sv[:2] / s_k, rank=r)
        updates.append(
            ClientUpdate(client_id=c, num_examples=1, A=A, B=B, scaling=dict.fromkeys(LAYERS, s_k))
        )
    state = initial_state()
    result = aggregate(method, method.plan(1), state, updates, [1.0, 2.0, 3.0])
    errors = update_error(
        before=state,
        updates=updates,
        weights=[1.0, 2.0, 3.0],
        scaling=dict.fromkeys(LAYERS, S),
        result=result,
    )
    for k, d in D.items():
        torch.testing.assert_close(S * result.state.B[k] @ result.state.A[k], d)
        assert errors[k] == pytest.approx(0.0, abs=1e-12)
        for c, r in enumerate(RANKS):
            start = method.client_start(result.state, client_id=c, plan=method.plan(2))
            torch.testing.assert_close(ALPHA / r * start.B[k] @ start.A[k], d)


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_client_order_does_not_matter(name):
    results, starts = [], []
    for order in (slice(None), slice(None, None, -1)):
        method = build_method(name, config(name, "hetlora_gamma=0.5"))
        state = random_state(3)
        plan, _, updates = a_round(method, state, [0, 1, 2], seed=10)
        updates = updates[order]
        results.append(aggregate(method, plan, state, updates, [u.num_examples for u in updates]))
        starts.append(
            [
                method.client_start(results[-1].state, client_id=c, plan=method.plan(2))
                for c in range(3)
            ]
        )
    for layer in LAYERS:
        torch.testing.assert_close(
            results[0].state.A[layer], results[1].state.A[layer], rtol=1e-9, atol=1e-9
        )
        torch.testing.assert_close(
            results[0].state.B[layer], results[1].state.B[layer], rtol=1e-9, atol=1e-9
        )
        for one, other in zip(*starts, strict=True):
            torch.testing.assert_close(one.A[layer], other.A[layer], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(one.B[layer], other.B[layer], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_state_survives_a_json_round_trip(name):
    """What the checkpoint saves (JSON) gives a fresh method the same client starts: the
    ranks above the global one (client 2) and HetLoRA's pruned ranks."""
    cfg = config(name, "hetlora_gamma=0.5")
    method = build_method(name, cfg)
    state = random_state(4)
    fresh = build_method(name, cfg)  # round 0: the seeded initial ranks agree unsaved
    fresh.load_state_dict(json.loads(json.dumps(method.state_dict())))
    for c in range(3):
        one = method.client_start(state, client_id=c, plan=method.plan(1))
        other = fresh.client_start(state, client_id=c, plan=fresh.plan(1))
        assert all(
            torch.equal(one.A[k], other.A[k]) and torch.equal(one.B[k], other.B[k]) for k in LAYERS
        )
    plan, _, updates = a_round(method, state, [0, 1, 2], seed=20)
    result = aggregate(method, plan, state, updates, [1.0, 1.0, 1.0])
    restored = build_method(name, cfg)
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())))
    for c in range(3):
        one = method.client_start(result.state, client_id=c, plan=method.plan(2))
        other = restored.client_start(result.state, client_id=c, plan=restored.plan(2))
        for k in LAYERS:
            assert torch.equal(one.A[k], other.A[k]) and torch.equal(one.B[k], other.B[k])


def test_no_state_when_the_global_rank_holds_every_client():
    for name in ("flexlora", "hetlora"):
        method = build_method(name, config(name, ranks=[1, 2, 3]))
        state = random_state(0)
        plan, _, updates = a_round(method, state, [0, 1, 2], seed=1)
        aggregate(method, plan, state, updates, [1.0, 1.0, 1.0])
        assert "tail" not in method.state_dict()


# -- HetLoRA ---------------------------------------------------------------------------


def padded_reference(replies, *, client_alpha="fixed"):
    """Sparsity-weighted mean of the zero-padded factors, from dense matrices."""
    norms = [
        sum(float(torch.linalg.norm(u.scaling[k] * u.B[k] @ u.A[k])) ** 2 for k in LAYERS) ** 0.5
        for u in replies
    ]
    p = [n / sum(norms) for n in norms]
    top = max(RANK, *RANKS)
    ref_A = {k: torch.zeros(top, i, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    ref_B = {k: torch.zeros(o, top, dtype=torch.float64) for k, (o, i) in LAYERS.items()}
    for p_k, u in zip(p, replies, strict=True):
        for k in LAYERS:
            r = u.A[k].shape[0]
            ref_A[k][:r] += p_k * u.A[k]
            ref_B[k][:, :r] += p_k * u.scaling[k] / S * u.B[k]  # in the global scaling
    return ref_A, ref_B


@pytest.mark.parametrize("client_alpha", ["fixed", "proportional"])
def test_hetlora_is_the_sparsity_weighted_mean_of_padded_replies(client_alpha):
    method = build_method(
        "hetlora", config("hetlora", "hetlora_gamma=1", f"client_alpha={client_alpha}")
    )
    state = random_state(5)
    plan, starts, updates = a_round(method, state, [0, 1, 2], seed=30, client_alpha=client_alpha)
    for c, start in starts.items():  # distribution by truncation, in the client's scaling
        for k in LAYERS:
            s_k = client_scaling(RANKS[c], client_alpha)
            r = min(RANKS[c], RANK)
            torch.testing.assert_close(start.A[k][:r], state.A[k][:r])
            torch.testing.assert_close(s_k * start.B[k][:, :r], S * state.B[k][:, :r])
    # weighting=method is uniform for HetLoRA: the weights are the sparsity weights alone
    assert method.paper_weighting == "uniform"
    result = aggregate(method, plan, state, updates, [1.0, 1.0, 1.0])
    ref_A, ref_B = padded_reference(updates, client_alpha=client_alpha)
    top_start = method.client_start(result.state, client_id=2, plan=method.plan(2))
    s_top = client_scaling(5, client_alpha)
    for k in LAYERS:
        torch.testing.assert_close(result.state.A[k], ref_A[k][:RANK], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result.state.B[k], ref_B[k][:, :RANK], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(top_start.A[k], ref_A[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s_top * top_start.B[k], S * ref_B[k], rtol=1e-10, atol=1e-12)
    assert [method.rank_of(c) for c in range(3)] == RANKS  # gamma = 1: nothing pruned


def with_tail(reply, factor, gamma):
    """``reply`` with the ranks HetLoRA would prune multiplied by ``factor``."""
    r = next(iter(reply.A.values())).shape[0]
    t = aggregation.pruned_rank(r, gamma=gamma) if r > 1 else 0
    A = {k: torch.cat([a[:t], factor * a[t:]]) for k, a in reply.A.items()}
    B = {k: torch.cat([b[:, :t], factor * b[:, t:]], dim=1) for k, b in reply.B.items()}
    return dataclasses.replace(reply, A=A, B=B)


def test_hetlora_prunes_a_client_whose_tail_shrank_and_drops_that_tail():
    gamma = 0.5
    method = build_method("hetlora", config("hetlora", f"hetlora_gamma={gamma}"))
    state = random_state(6)
    plan = method.plan(1)
    sent = {c: method.client_start(state, client_id=c, plan=plan) for c in (0, 1)}
    shrunk = with_tail(
        dataclasses.replace(trained(0, sent[0], seed=1), A=sent[0].A, B=sent[0].B), 0.5, gamma
    )
    grown = with_tail(
        dataclasses.replace(trained(1, sent[1], seed=2), A=sent[1].A, B=sent[1].B), 2.0, gamma
    )
    result = aggregate(method, plan, state, [shrunk, grown], [1.0, 1.0])
    # client 0 (rank 2) prunes to floor(0.5 * 2) = 1; client 1 keeps 3; client 2 did not train
    assert [method.rank_of(c) for c in range(3)] == [1, 3, 5]
    assert (
        next(
            iter(method.client_start(result.state, client_id=0, plan=method.plan(2)).A.values())
        ).shape[0]
        == 1
    )
    # the pruned rank of client 0 is not in the aggregate: it sent only its leading rank
    cut = dataclasses.replace(
        shrunk,
        A={k: a[:1] for k, a in shrunk.A.items()},
        B={k: b[:, :1] for k, b in shrunk.B.items()},
    )
    ref_A, ref_B = padded_reference([cut, grown])
    for k in LAYERS:
        torch.testing.assert_close(result.state.A[k], ref_A[k][:RANK], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result.state.B[k], ref_B[k][:, :RANK], rtol=1e-10, atol=1e-12)


def test_hetlora_identical_replies_give_back_what_the_clients_send():
    """Three identical rank-3 clients whose tails shrank: each prunes to rank 2, and the global
    adapter is their common pruned reply (its pruned rank zero)."""
    method = build_method("hetlora", config("hetlora", "hetlora_gamma=0.7", ranks=[3, 3, 3]))
    state = random_state(8)
    plan = method.plan(1)
    sent = method.client_start(state, client_id=0, plan=plan)
    base = trained(0, sent, seed=3)
    base = with_tail(dataclasses.replace(base, A=sent.A, B=sent.B), 0.1, 0.7)
    replies = [dataclasses.replace(base, client_id=c) for c in range(3)]
    result = aggregate(method, plan, state, replies, [1.0, 2.0, 3.0])
    assert [method.rank_of(c) for c in range(3)] == [2, 2, 2]
    for k in LAYERS:
        A, B = aggregation.zero_pad(base.A[k][:2], base.B[k][:, :2], rank=RANK)
        torch.testing.assert_close(result.state.A[k], A)
        torch.testing.assert_close(result.state.B[k], B)


def test_hetlora_ranks_never_grow_over_rounds():
    method = build_method("hetlora", config("hetlora", "hetlora_gamma=0.6"))
    state = random_state(9)
    seen = [[method.rank_of(c) for c in range(3)]]
    for t in range(1, 6):
        plan, starts, updates = a_round(method, state, [0, 1, 2], seed=100 * t, round=t)
        # every other round the tails shrink, so that pruning happens
        if t % 2:
            updates = [
                with_tail(
                    dataclasses.replace(u, A=starts[u.client_id].A, B=starts[u.client_id].B),
                    0.3,
                    0.6,
                )
                for u in updates
            ]
        state = aggregate(method, plan, state, updates, [1.0, 1.0, 1.0]).state
        seen.append([method.rank_of(c) for c in range(3)])
    for before, after in zip(seen[:-1], seen[1:], strict=True):
        assert all(a <= b for a, b in zip(after, before, strict=True))
    assert seen[-1] != seen[0] and min(seen[-1]) >= 1


# -- configuration and the real model ----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["method=flexlora", "client_ranks=[2,4]"],
            "'client_ranks' must list one rank >= 1 per client (3)",
        ),
        (["method=hetlora", "client_ranks=[2,0,4]"], "'client_ranks' must list one rank >= 1"),
        (["method=fedavg", "client_ranks=[2,4,8]"], "needs a method with per-client ranks"),
        (["method=hetlora", "hetlora_gamma=0"], "'hetlora_gamma' must be in (0, 1]"),
        (["method=hetlora", "hetlora_gamma=1.5"], "'hetlora_gamma' must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_overrides, overrides, fragment):
    code = main(["run", *tiny_overrides, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fedlora: error: ") and "\n" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize("client_alpha", ["fixed", "proportional"])
def test_rank_scaling_is_the_one_peft_gives_each_rank(tiny_overrides, client_alpha):
    cfg = load_config(
        None,
        [
            *tiny_overrides,
            "method=flexlora",
            "client_ranks=[2,4,8]",
            f"client_alpha={client_alpha}",
        ],
    )
    fed = build_federation(cfg, log=silent)
    fed.adapter.use_rank(cfg.rank)
    global_scaling = fed.adapter.scaling()
    for r in (2, 4, 8):
        fed.adapter.use_rank(r)
        for layer, s_k in fed.adapter.scaling().items():
            assert s_k / global_scaling[layer] == pytest.approx(
                rank_scaling(r, rank=cfg.rank, client_alpha=client_alpha)
            )


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_runs_and_resumes_exactly(tiny_overrides, tmp_path, name):
    """Through the real round loop with ranks above the global one (8 > 4): a run cut after
    round 1 and resumed ends with the same adapter and method state as one that was not."""
    cfg = load_config(
        None, [*tiny_overrides, f"method={name}", "client_ranks=[2,4,8]", "hetlora_gamma=0.5"]
    )
    fed = build_federation(cfg, log=silent)
    full = run_federated(fed, build_method(name, cfg), RunDir(tmp_path / "full"), log=silent)
    fed.cfg = cfg.replace(rounds=1)
    cut = RunDir(tmp_path / "cut")
    run_federated(fed, build_method(name, fed.cfg), cut, log=silent)
    fed.cfg = cfg
    ckpt = load_checkpoint(tmp_path / "cut")
    resumed = run_federated(fed, build_method(name, cfg), cut, log=silent, resume=ckpt)
    for layer in full["state"].A:
        assert torch.equal(resumed["state"].A[layer], full["state"].A[layer])
        assert torch.equal(resumed["state"].B[layer], full["state"].B[layer])
    assert resumed["method_state"] == full["method_state"]
    assert "tail" in full["method_state"]  # client 2's ranks 4..7 lived in the method state
    rows = read_metrics(tmp_path / "full")
    assert all(r["agg_error"]["mean"] >= 0 for r in rows[1:])
    # round 1: each client uploads A and B at its own rank (2, 4, 8), and the head
    start = fed.initial_state
    per_rank = sum(4 * (a.shape[1] + start.B[k].shape[0]) for k, a in start.A.items())
    head = sum(t.numel() * t.element_size() for t in start.head.values())
    assert rows[1]["upload_bytes"] == (2 + 4 + 8) * per_rank + 3 * head
