"""A causal LM with expert LoRA and the gate that mixes the experts per example.

:class:`ExpertLoraModel` owns the decoder call. ``forward(gate_input, **decoder_inputs)`` turns each
example's gate input ``z`` into expert weights ``softmax(W z / T)``, hands them to the adapted layers
for this call only, and runs the decoder; nothing else sets them. ``K = 1`` has no gate: plain peft LoRA.

:meth:`ExpertLoraModel.compile_decoder` compiles the decoder layer by layer (regional compilation):
every layer runs the same code, so one graph -- compiled once, reused by all layers -- serves each
path (a training step, a scoring pass). That keeps compilation to seconds where compiling the whole
decoder as one graph took minutes. Sequence lengths become dynamic after they first change; each
batch size compiles once (training and scoring keep theirs fixed but for an epoch's last batch), so
each path compiles a few times and then never again.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from recbole_ilora.expert_lora.config import ExpertLoraConfig
from recbole_ilora.expert_lora.layer import ExpertRouting, attach_routing


class ExpertLoraModel(nn.Module):
    """``peft_model``: an LLM with peft LoRA of rank ``settings.rank`` (``get_peft_model(llm, settings.to_peft())``);
    ``gate``: ``Linear(d -> K)`` on the gate input when ``settings.num_experts > 1``, else None."""

    def __init__(self, peft_model: nn.Module, settings: ExpertLoraConfig, gate: nn.Linear | None = None,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if settings.gated != (gate is not None) or (gate is not None and gate.out_features != settings.num_experts):
            raise ValueError(f"{settings.num_experts} experts need a gate with {settings.num_experts} outputs "
                             f"(none for one expert), got {gate}.")
        self.settings = settings
        self.peft_model = peft_model
        self.gate = gate
        self.routing = None
        if gate is not None:
            self.routing = ExpertRouting(settings.rank)
            attach_routing(peft_model, self.routing)
        self.autocast_dtype = autocast_dtype
        self.compiled = False

    # Views into the peft-wrapped LLM (properties, so no module is registered twice).
    @property
    def causal_lm(self) -> nn.Module:
        return self.peft_model.get_base_model()

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def embed_tokens(self) -> nn.Module:
        return self.causal_lm.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.embedding_dim

    def autocast(self):
        """Mixed precision on GPU when the LLM is in half precision (the projector and gate stay fp32)."""
        return torch.autocast("cuda", dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    # ------------------------------------------------------------------------------------------ gate
    def expert_weights(self, gate_input: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` mixture weights ``softmax(W z / T)``."""
        return torch.softmax(self.gate(gate_input.float()) / self.settings.gate_temperature, dim=-1)

    def _rank_weights(self, gate_input: torch.Tensor | None) -> torch.Tensor | None:
        if self.gate is None:
            return None
        if gate_input is None:
            raise ValueError(f"ExpertLoraModel with {self.settings.num_experts} experts needs a gate input per example.")
        with torch.autocast(gate_input.device.type, enabled=False):  # the gate stays in fp32
            weights = self.expert_weights(gate_input).repeat_interleave(self.settings.expert_rank, dim=-1)
        return weights * self.settings.gate_scale

    # --------------------------------------------------------------------------------------- decoding
    def forward(self, gate_input: torch.Tensor | None = None, **decoder_inputs):
        """The decoder's output for ``decoder_inputs``, each example through its own expert mixture."""
        with self._routed(gate_input) as routing_kwargs:
            return self.decoder(**decoder_inputs, **routing_kwargs)

    @torch.no_grad()
    def generate(self, gate_input: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Hugging Face generation, each example through its own expert mixture.

        ``generate`` refuses keyword arguments its model does not declare, so here the weights are handed
        to the routing for the whole generation instead. Always eager: generation's KV cache is addressed
        per layer index, which would specialise the compiled layer graph once per layer.
        """
        if self.routing is not None:
            self.routing.rank_weights = self._rank_weights(gate_input)
        try:
            with torch.compiler.set_stance("force_eager"):
                return self.causal_lm.generate(**generate_kwargs)
        finally:
            if self.routing is not None:
                self.routing.rank_weights = None

    @contextmanager
    def _routed(self, gate_input: torch.Tensor | None):
        """The decoder keyword argument that carries this call's per-example rank weights; cleared after the call."""
        if self.routing is None:
            yield {}
            return
        try:
            yield {ExpertRouting.KWARG: self._rank_weights(gate_input)}
        finally:
            self.routing.rank_weights = None

    # ---------------------------------------------------------------------------------------- compile
    def compile_decoder(self, **compile_kwargs) -> None:
        """Compile every decoder layer in place (see the module docstring); generation stays eager."""
        for layer in self.decoder.layers:
            layer.compile(**compile_kwargs)
        self.compiled = True
