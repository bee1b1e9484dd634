"""The mixture inside every adapted layer, as a forward pre-hook on peft's ``lora_B``.

``Σ_k w_k B_k A_k x = B · diag(w repeated r/K times) · A x``: the mixture is a per-example diagonal
scaling of the rank-``r`` activation between ``A`` and ``B``. A forward pre-hook on every peft
``lora_B`` module applies it: exact, no copy of peft's layer code, and it survives peft upgrades.

The per-example weights travel as a keyword argument of the decoder call (``expert_rank_weights``):
transformers hands the decoder's extra keyword arguments to every decoder layer, where a forward
pre-hook takes them for that layer's adapters. (peft's ``LoraLayer.forward`` passes unknown keyword
arguments to the base layer, so they cannot go further down as arguments; ``LoraVariant`` is private
API.) As an argument they are an input of a compiled layer graph, with a dynamic batch size.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertRouting:
    """Per-example rank weights ``[batch, r]`` of the decoder layer running, read by its hooked adapters.

    One object serves all layers (the paper's single gate). :meth:`receive` takes the weights from each
    decoder layer's keyword arguments; :class:`~recbole_ilora.expert_lora.model.ExpertLoraModel`
    clears them after the decoder call.
    """

    KWARG = "expert_rank_weights"

    def __init__(self, rank: int):
        self.rank = rank
        self.rank_weights: torch.Tensor | None = None

    def receive(self, decoder_layer: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs) of a decoder layer: keep its ``expert_rank_weights`` for its adapters."""
        if self.KWARG in kwargs:
            kwargs = dict(kwargs)
            self.rank_weights = kwargs.pop(self.KWARG)
        return args, kwargs

    def __call__(self, module: nn.Module, args: tuple):
        weights = self.rank_weights
        if weights is None:
            raise RuntimeError(
                "An expert LoRA layer ran outside ExpertLoraModel's decoder call, so it has no gate weights: call "
                "the LLM through ExpertLoraModel (forward or generate)."
            )
        hidden = args[0]
        if hidden.shape[0] != weights.shape[0]:
            raise RuntimeError(f"Gate weights are for a batch of {weights.shape[0]}, the layer got {hidden.shape[0]}.")
        shape = (weights.shape[0],) + (1,) * (hidden.dim() - 2) + (weights.shape[-1],)
        return (hidden * weights.view(shape).to(hidden.dtype),) + tuple(args[1:])


def attach_routing(peft_model: nn.Module, routing: ExpertRouting, adapter_name: str = "default") -> list:
    """Hook every decoder layer and every ``lora_B[adapter_name]`` of ``peft_model``; returns the hook handles."""
    decoder = peft_model.get_base_model().get_decoder()
    handles = [layer.register_forward_pre_hook(routing.receive, with_kwargs=True) for layer in decoder.layers]
    for name, module in peft_model.named_modules():
        if name.endswith(f"lora_B.{adapter_name}"):
            if module.in_features != routing.rank:
                raise ValueError(f"{name} has rank {module.in_features}, the routing expects {routing.rank}.")
            handles.append(module.register_forward_pre_hook(routing))
    if len(handles) == len(decoder.layers):
        raise ValueError("No peft LoRA layer found to route: check lora_target_modules against the LLM's module names.")
    return handles
