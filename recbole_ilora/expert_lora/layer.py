"""The mixture inside every adapted layer: a per-example scaling between peft's ``lora_A`` and ``lora_B``.

``Σ_k w_k B_k A_k x = B · diag(w repeated r/K times) · A x``: the mixture is a per-example diagonal
scaling of the rank-``r`` activation between ``A`` and ``B``. A forward pre-hook on every peft
``lora_B`` module applies it: exact, no copy of peft's layer code, and it survives peft upgrades.

How the weights reach the adapters. peft's ``LoraLayer.forward`` hands unknown keyword arguments to the
base layer and a decoder layer calls its projections without extra arguments, so the weights travel as
a keyword argument of the decoder call (``expert_rank_weights``): transformers hands the decoder's extra
keyword arguments to every decoder layer, and the layer hands them to its attention block. A pre-hook
of the attention block binds them for the layer's adapters; a hook after the layer's MLP releases them.
Both run *inside* the layer's forward, so when activation checkpointing recomputes a layer during the
backward pass -- after the model's forward returned, re-running the layer's forward but not the hooks
around the layer -- the recomputation binds the same weights again. Bindings nest (a stack): a call made
while a layer runs leaves that layer's weights as they were. ``generate`` cannot carry the keyword
(transformers refuses arguments its model does not declare): :meth:`ExpertRouting.generating` binds the
weights around the whole generation instead.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

ROUTING_KWARG = "expert_rank_weights"


class ExpertRouting:
    """Rank weights ``[batch, r]`` of the decoder-layer calls in progress, read by their adapters."""

    def __init__(self, rank: int):
        self.rank = rank
        self._bound: list[torch.Tensor | None] = []  # one entry per decoder-layer call in progress
        self._generating: list[torch.Tensor] = []  # weights of a generate call in progress
        self._calls = 0  # model calls in progress (more than one when a call is made while a layer runs)

    @property
    def layer_calls_in_progress(self) -> int:
        """Decoder-layer calls that hold bound weights now (0 between model calls: nothing outlives a call)."""
        return len(self._bound)

    def bind(self, attention: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs) of a decoder layer's attention: bind this layer call's weights."""
        if ROUTING_KWARG in kwargs:
            kwargs = dict(kwargs)
            weights = kwargs.pop(ROUTING_KWARG)
        else:
            weights = self._generating[-1] if self._generating else None
        self._bound.append(weights)
        return args, kwargs

    def release(self, mlp: nn.Module, args: tuple, output):
        """Forward hook of a decoder layer's MLP, its last adapted block: the layer call is over."""
        self._bound.pop()

    def scale(self, lora_b: nn.Module, args: tuple):
        """Forward pre-hook of a ``lora_B``: scale each example's rank-``r`` activation by its weights."""
        weights = self._bound[-1] if self._bound else None
        if weights is None:
            raise RuntimeError(
                "An expert LoRA layer ran without gate weights: call the LLM through its ExpertLoraModel "
                "(forward with gate_input=..., decoder_kwargs(gate_input) for the decoder alone, or generate)."
            )
        hidden = args[0]
        if hidden.shape[0] != weights.shape[0]:
            raise RuntimeError(f"Gate weights are for a batch of {weights.shape[0]}, the layer got {hidden.shape[0]}.")
        shape = (weights.shape[0],) + (1,) * (hidden.dim() - 2) + (weights.shape[-1],)
        return (hidden * weights.view(shape).to(hidden.dtype),) + tuple(args[1:])

    @contextmanager
    def generating(self, weights: torch.Tensor):
        """Bind ``weights`` for every decoder-layer call of a generation (which cannot carry them as an argument)."""
        self._generating.append(weights)
        try:
            yield
        finally:
            self._generating.pop()

    @contextmanager
    def call(self):
        """One model call: what a failing layer left bound is released when it ends (all of it, when no other call
        is in progress; a call of the LLM outside its ExpertLoraModel leaves a binding when it fails)."""
        depth = len(self._bound)
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1
            del self._bound[depth if self._calls else 0:]


def attach_routing(decoder_layers, lora_b_modules, routing: ExpertRouting) -> list:
    """Hook each decoder layer's attention and MLP, and the ``lora_B`` modules; returns the handles (removed with
    the adapter). Decoder layers of the Llama family (Llama, Mistral, Qwen, Gemma) call ``self_attn`` with the
    layer's keyword arguments, then ``mlp``."""
    handles = []
    for layer in decoder_layers:
        if not (isinstance(getattr(layer, "self_attn", None), nn.Module) and isinstance(getattr(layer, "mlp", None), nn.Module)):
            raise NotImplementedError(
                f"Expert LoRA routes decoder layers with a self_attn and an mlp block (the Llama family); "
                f"{type(layer).__name__} has other parts."
            )
        handles.append(layer.self_attn.register_forward_pre_hook(routing.bind, with_kwargs=True))
        # (not always_call: its per-layer hook id would make torch.compile specialise on each layer; a failed layer
        # call is cleaned up by ExpertRouting.call)
        handles.append(layer.mlp.register_forward_hook(routing.release))
    for name, module in lora_b_modules:
        if module.in_features != routing.rank:
            raise ValueError(f"{name} has rank {module.in_features}, the routing expects {routing.rank}.")
        handles.append(module.register_forward_pre_hook(routing.scale))
    return handles
