"""Clients in lockstep on decoders: the per-client causal-LM loss (the mean over each
client's own response tokens) and GPT-2's transposed Conv1D base give each client the
update it gets trained alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedlora.client import LocalTraining, train_client
from fedlora.client.lockstep import train_clients_lockstep
from fedlora.config import load_config
from fedlora.federation import build_federation
from fedlora.log import silent
from fedlora.messages import AdapterState, RoundPlan


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_clients_in_lockstep_equal_each_alone(
    family, tiny_llama_dir, tiny_gpt2_dir, llm_overrides
):
    model = {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[family]
    fed = build_federation(load_config(None, [*llm_overrides, f"model={model}"]), log=silent)
    for module in fed.adapter.model.modules():  # GPT-2's dropout: equal gradients, equal steps
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    g = torch.Generator().manual_seed(0)
    jobs = []
    for cid, splits in sorted(fed.encoded.items()):
        s = fed.initial_state
        state = AdapterState(
            A=dict(s.A),
            B={
                k: v + 0.05 * torch.randn(v.shape, generator=g).to(v.device) for k, v in s.B.items()
            },
            head=dict(s.head),
        )
        data = splits.train
        if cid == 1:  # fewer rows than a batch: unequal segments, another width
            data = dataclasses.replace(
                data,
                input_ids=data.input_ids[:3],
                attention_mask=data.attention_mask[:3],
                labels=data.labels[:3],
            )
        jobs.append((cid, state, data))
    plan = RoundPlan(round=1, trained="AB", train_head=False, method="t")
    # SGD: its step scales with the gradient (Adam's would hide a loss weighted per client)
    settings = LocalTraining(local_steps=2, batch_size=4, lr=0.5, optimizer="sgd")
    expected = [
        train_client(
            adapter=fed.adapter,
            state=state,
            data=data,
            plan=plan,
            settings=settings,
            client_id=cid,
            seed=0,
        )
        for cid, state, data in jobs
    ]
    got = train_clients_lockstep(
        adapter=fed.adapter, jobs=jobs, plan=plan, settings=settings, seed=0
    )
    for u, e in zip(got, expected, strict=True):
        assert set(u.A) == set(e.A) and set(u.B) == set(e.B) and not u.head
        for name in e.A:
            torch.testing.assert_close(u.A[name], e.A[name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(u.B[name], e.B[name], rtol=1e-5, atol=1e-5)
        assert u.train_loss == pytest.approx(e.train_loss, rel=1e-5)
