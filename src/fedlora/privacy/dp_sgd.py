"""DP-SGD local training: the client loop of :mod:`fedlora.client.train`, made private.

Each step draws a Poisson batch ``S`` (every example independently with probability
``q``), computes per-example gradients ``g_i`` of every trainable tensor (the LoRA
factors the round trains, and the head if it is trained) with Opacus' hooks, and feeds
the inner optimizer

    g = ( sum_{i in S} g_i * min(1, C / ||g_i||)  +  N(0, sigma^2 C^2 I) ) / (q n)

(Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; Opacus' ``DPOptimizer``
adds ``1e-6`` to the norm).

``dp.secure_mode`` is for deployments: Opacus' secure noise (each Gaussian draw the
combination of four, against the floating-point attack of arXiv 2107.10138) and noise and
sampling streams seeded from ``secrets`` (the OS entropy) instead of the config seed.
Opacus' own ``PrivacyEngine(secure_mode=True)`` would also draw from torchcsprng's
cryptographic generator, but torchcsprng has no release for current torch (0.2.1 needs torch
1.8), so the streams here are torch's Mersenne Twister with an unpredictable seed: not a
CSPRNG, but no longer derivable from ``config.yaml``. ``||g_i||`` is the norm over *all* trainable tensors together,
so one example moves the whole trained update by at most ``C`` before noise.

The in-process runtime shares one PEFT model among all clients: the model is wrapped in a
``GradSampleModule`` for this client's round only and unwrapped afterwards, so no hooks or
``grad_sample`` attributes leak into evaluation, another client or the next round (whose
trainable factor may differ: RoLoRA). The accountant in :class:`ClientPrivacy` is the part
that persists.
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedlora.client.train import LocalTraining, client_seed, make_optimizer, make_scheduler
from fedlora.data import Encoded
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.models.adapter import PeftAdapter
from fedlora.models.device import autocast, model_device, to_device
from fedlora.privacy.accounting import ClientPrivacy

# Offsets the noise stream from the batch-sampling stream of the same (seed, round, client).
_NOISE_STREAM = 0x5EED


def poisson_batches(
    n: int, *, steps: int, sample_rate: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """``steps`` batches, each holding every index of ``range(n)`` with probability
    ``sample_rate`` independently (Opacus' ``UniformWithReplacementSampler``; may be empty).

    This is the sampling the accountant's subsampled Gaussian mechanism assumes: a
    shuffled fixed-size batch would need a different (and looser) analysis.
    """
    return [
        torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()
        for _ in range(steps)
    ]


def train_client_dp(
    *,
    adapter: PeftAdapter,
    state: AdapterState,
    data: Encoded,
    plan: RoundPlan,
    settings: LocalTraining,
    client_id: int,
    seed: int,
    privacy: ClientPrivacy,
    optimizer_state: dict[str, Any] | None = None,
) -> ClientUpdate:
    """:func:`~fedlora.client.train_client` with per-example clipping, noise and accounting.

    ``settings.batch_size`` is the *expected* batch size; ``privacy`` holds the noise, the
    clipping bound, the sample rate and the accountant, which takes one step per noisy
    optimizer step.
    """
    adapter.set_state(state)
    params = adapter.set_trainable(plan.trained, head=plan.train_head)
    seed_k = client_seed(seed, plan.round, client_id)
    # Simulation: both streams follow from config.yaml, so a run can be reproduced.
    # secure_mode (deployments): both are seeded from the operating system's entropy, so
    # nobody holding the config can regenerate the noise and subtract it.
    sampling_seed = secrets.randbits(63) if privacy.secure_mode else seed_k
    noise_seed = secrets.randbits(63) if privacy.secure_mode else seed_k ^ _NOISE_STREAM
    batches = poisson_batches(
        len(data),
        steps=settings.local_steps,
        sample_rate=privacy.sample_rate,
        generator=torch.Generator().manual_seed(sampling_seed),
    )
    torch.manual_seed(seed_k)  # dropout masks
    model = adapter.model
    device = model_device(model)
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    losses = []
    try:
        inner = make_optimizer(params, settings)
        if optimizer_state:
            inner.load_state_dict(optimizer_state)
        optimizer = DPOptimizer(
            inner,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=privacy.expected_batch_size,
            loss_reduction="mean",
            generator=torch.Generator().manual_seed(noise_seed),
            secure_mode=privacy.secure_mode,
        )
        optimizer.attach_step_hook(privacy.step_hook())
        scheduler = make_scheduler(inner, settings, steps=len(batches), round=plan.round)
        wrapped.train()  # Opacus captures activations only in training mode
        with warnings.catch_warnings():
            # The first hooked LoRA layer's input comes from frozen layers, so torch warns
            # on every backward that the hook sees no input gradient; Opacus needs only
            # the output gradient.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for idx in batches:
                if len(idx) == 0:
                    # An empty Poisson batch is still a step of the mechanism: its update
                    # is pure noise, and the accountant must count it.
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))  # type: ignore[attr-defined]
                else:
                    with autocast(settings.precision, device):
                        loss = wrapped(**to_device(data.batch(idx), device)).loss
                    loss.backward()
                    losses.append(loss.item())
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        wrapped.to_standard_module()  # removes hooks and per-sample attributes
        model.eval()
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(inner.state_dict())
    sent = adapter.get_state(plan.trained, head=plan.train_head)
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(data),
        A=sent.A,
        B=sent.B,
        head=sent.head,
        train_loss=sum(losses) / len(losses) if losses else float("nan"),
        scaling=adapter.scaling(),
        steps=len(batches),
    )
