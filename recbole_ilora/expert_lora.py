"""Instance-wise mixture of LoRA experts on stock peft.

iLoRA splits a rank-``r`` LoRA pair into ``K`` experts of rank ``r/K`` -- rows of ``A``, columns of
``B`` -- and mixes them per example: ``ΔW x = s · Σ_k w_k B_k A_k x`` with gate weights ``w`` that sum
to one. Since ``Σ_k w_k B_k A_k x = B · diag(w repeated r/K times) · A x``, the mixture is a
per-example diagonal scaling of the rank-``r`` activation between ``A`` and ``B``. We apply it with a
forward pre-hook on every peft ``lora_B`` module: exact, no copy of peft's layer code, and it
survives peft upgrades. (peft's ``LoraLayer.forward`` forwards unknown kwargs to the base layer, so a
gate cannot be passed as an argument; ``LoraVariant`` is private API.)

Scaling ``s``: peft uses ``alpha / r``. The authors scale each expert by ``alpha / (r/K)``, i.e. ``K``
times peft's; with gate weights near ``1/K`` this restores plain LoRA's magnitude. ``expert_scaling:
per_expert`` (default, the authors') multiplies the gate by ``K``; ``expert_scaling: peft`` keeps
peft's. For ``K = 1`` both are exactly plain peft LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_SCALINGS = ("per_expert", "peft")


class ExpertGateState:
    """The gate weights of the current forward pass, read by every adapted layer's hook.

    One object is shared by all layers (the paper's single gate). ``weights`` is ``[batch, r]``:
    the per-expert weights repeated ``r/K`` times (and times ``K`` under per-expert scaling).
    """

    def __init__(self, rank: int, num_experts: int, expert_scaling: str = "per_expert"):
        if num_experts < 1 or rank % num_experts != 0:
            raise ValueError(
                f"lora_rank ({rank}) must be divisible by num_experts ({num_experts}): each expert gets "
                f"rank lora_rank/num_experts. Choose e.g. lora_rank={num_experts * max(1, rank // num_experts)}."
            )
        if expert_scaling not in EXPERT_SCALINGS:
            raise ValueError(f"expert_scaling must be one of {EXPERT_SCALINGS}, got {expert_scaling!r}.")
        self.rank = rank
        self.num_experts = num_experts
        self.expert_scaling = expert_scaling
        self.weights: torch.Tensor | None = None

    def set(self, expert_weights: torch.Tensor) -> None:
        """Set ``[batch, K]`` gate weights for the next forward pass(es)."""
        factor = self.num_experts if self.expert_scaling == "per_expert" else 1
        self.weights = expert_weights.repeat_interleave(self.rank // self.num_experts, dim=-1) * factor

    def clear(self) -> None:
        self.weights = None

    def scale(self, module: nn.Module, args: tuple):
        weights = self.weights
        if weights is None:
            raise RuntimeError(
                "An iLoRA adapter ran without gate weights: call the LLM through iLoRA (which sets the gate "
                "for each batch), or use ExpertGateState.set() before calling the adapted model directly."
            )
        hidden = args[0]
        if hidden.shape[0] != weights.shape[0]:
            raise RuntimeError(f"Gate weights are for a batch of {weights.shape[0]}, the LLM got {hidden.shape[0]}.")
        shape = (weights.shape[0],) + (1,) * (hidden.dim() - 2) + (weights.shape[-1],)
        return (hidden * weights.view(shape).to(hidden.dtype),) + tuple(args[1:])


def attach_expert_gate(peft_model: nn.Module, state: ExpertGateState, adapter_name: str = "default") -> list:
    """Hook every ``lora_B[adapter_name]`` of ``peft_model``; returns the hook handles."""
    handles = []
    for name, module in peft_model.named_modules():
        if name.endswith(f"lora_B.{adapter_name}"):
            if module.in_features != state.rank:
                raise ValueError(f"{name} has rank {module.in_features}, the gate expects {state.rank}.")
            handles.append(module.register_forward_pre_hook(state.scale))
    if not handles:
        raise ValueError("No peft LoRA layer found to gate: check lora_target_modules against the LLM's module names.")
    return handles
