"""FedSA-LoRA: share and average ``A`` only; each client keeps its own ``B``.

Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025 (arXiv 2410.01463). The paper finds that the learned ``A``
matrices carry what clients share and the ``B`` matrices what is client-specific: every
client trains both, sends only ``A_k``, and the server sets ``A = sum_k (n_k / n) A_k``
(:func:`fedlora.aggregation.fedsa`); client ``k``'s model after the round is
``W0 + s B_k A``, its own ``B_k`` on the shared ``A``.

Choices made here, and why:

- **The head is private too.** The paper shares "only ``A``"; the authors' GLUE
  configuration keeps the classifier local as well (``personalization.local_param:
  ['lora_B', 'classifier']``). With DoRA (``adapter=dora``, not in the paper) the
  magnitude vectors, which scale ``B``'s output side, stay with the client as well.
- **Weights**: FedAvg's example counts (``paper_weighting``), as the authors' code averages.
- **The global model** is the shared ``A`` with ``B`` and the head as they were at
  initialisation: the server never sees a ``B``, and forming one (say the mean of the
  clients') would need the clients to send it. With PEFT's ``B = 0`` that global model is
  the pretrained model with its initial head, so its accuracy (``accuracy`` in the rows)
  stays at round 0's; FedSA-LoRA's result is ``personal_accuracy``, each client's own
  model on its own eval split (what the paper reports), logged beside it.
- **No ``agg_error``**: it compares the clients' mean update with the global model's, and
  FedSA-LoRA has no global update (:attr:`~fedlora.methods.base.LoRAMethod.private`).
- ``default_lr``: FedAvg-LoRA's 3e-3 (the paper's 2e-2 is for SGD on RoBERTa-large; not
  tuned here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora import aggregation
from fedlora.messages import AdapterState, ClientUpdate, RoundPlan
from fedlora.methods.base import Aggregate, LoRAMethod


class FedSALoRA(LoRAMethod):
    name = "fedsa"
    trained = "AB"
    private = ("B", "head", "magnitude")

    def aggregate(
        self,
        *,
        plan: RoundPlan,
        state: AdapterState,
        updates: Sequence[ClientUpdate],
        weights: Sequence[float],
        scaling: Mapping[str, float],
    ) -> Aggregate:
        new_A = {
            layer: aggregation.fedsa([u.A[layer] for u in updates], weights) for layer in state.A
        }
        # B, the head and the magnitude never reach the server: the global ones stay put
        return Aggregate(
            state=AdapterState(
                A=new_A, B=dict(state.B), head=dict(state.head), magnitude=dict(state.magnitude)
            )
        )
