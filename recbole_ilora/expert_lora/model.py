"""The expert LoRA tuner: peft's LoRA layers split into experts, the gate that mixes them per example, the
projector of behavioural tokens, and optionally the head of the user-representation distillation.

:class:`ExpertLoraModel` is a peft tuner (a ``LoraModel``): ``get_peft_model(llm, ExpertLoraConfig(...))``
injects stock peft LoRA layers of rank ``r`` and adds, as model-level containers keyed by the adapter
name (saved and loaded by peft with the LoRA weights, as VeRA's shared matrices are):

- ``expert_gate``: ``Linear(gate_input_size -> K, no bias)``; ``softmax(W z / T)`` are the expert weights;
- ``behaviour_projector``: ``Linear -> GELU -> Linear`` from behaviour vectors to the LLM's input width;
- ``user_distill_head`` (only with ``distill_output_size``): ``Linear -> GELU -> Linear`` from the LLM's hidden
  width to SASRec's (the projector's mirror), for the distillation loss at the last prompt position.

The gate weights of one call are handed in with the call: ``forward(..., gate_input=z)``, or
:meth:`ExpertLoraModel.decoder_kwargs` for a call of the decoder alone (:mod:`.layer` says how they reach
every adapted layer). ``K = 1`` has no gate: plain peft LoRA.

:meth:`ExpertLoraModel.compile_decoder` compiles the decoder layer by layer (regional compilation):
every layer runs the same code, so one graph -- compiled once, reused by all layers -- serves each
path (a training step, a scoring pass), in seconds where compiling the whole decoder took minutes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraModel
from torch import nn

from recbole_ilora.expert_lora.config import ExpertLoraConfig
from recbole_ilora.expert_lora.layer import ROUTING_KWARG, ExpertRouting, attach_routing


def behaviour_projector(input_size: int, hidden_size: int) -> nn.Module:
    """LLaRA's projector: behaviour vector -> one input embedding of the LLM."""
    return nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


def user_distill_head(hidden_size: int, output_size: int) -> nn.Module:
    """The projector's mirror: one hidden state of the LLM -> the width of SASRec's sequence representation."""
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, output_size))


class ExpertLoraModel(LoraModel):
    """peft tuner of :class:`~recbole_ilora.expert_lora.config.ExpertLoraConfig` (one adapter)."""

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        self._routing_handles: list = []
        self.routing: ExpertRouting | None = None
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------------------ injection
    def _post_injection_hook(self, model: nn.Module, config: ExpertLoraConfig, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        if len(self.peft_config) > 1:
            raise NotImplementedError("ExpertLoraModel holds one adapter; load another model for another adapter.")
        hidden_size = model.get_input_embeddings().embedding_dim
        if config.projector_input_size:
            self.behaviour_projector = nn.ModuleDict({adapter_name: behaviour_projector(config.projector_input_size,
                                                                                        hidden_size)})
        if config.gated:
            self.expert_gate = nn.ModuleDict({adapter_name: nn.Linear(config.gate_input_size, config.num_experts,
                                                                      bias=False)})
            self.routing = ExpertRouting(config.r)
            lora_b = [(name, module) for name, module in model.named_modules() if name.endswith(f"lora_B.{adapter_name}")]
            if not lora_b:
                raise ValueError("No LoRA layer found to route: check lora_target_modules against the LLM's module names.")
            self._routing_handles = attach_routing(model.get_decoder().layers, lora_b, self.routing)
        if config.distill_output_size:  # last: the parts above draw the same initial values with or without it
            self.user_distill_head = nn.ModuleDict({adapter_name: user_distill_head(hidden_size,
                                                                                    config.distill_output_size)})
        device = model.get_input_embeddings().weight.device
        for container in ("expert_gate", "behaviour_projector", "user_distill_head"):
            if hasattr(self, container):  # kept in fp32: small, and trained
                getattr(self, container).to(device).requires_grad_(not config.inference_mode)

    def _check_merge_allowed(self):
        raise ValueError("Expert LoRA mixes its experts per example: there is no single weight to merge them into.")

    def _unload_and_optionally_merge(self, *args, **kwargs):
        for handle in self._routing_handles:
            handle.remove()
        self._routing_handles = []
        return super()._unload_and_optionally_merge(*args, **kwargs)

    # --------------------------------------------------------------------------------- parts
    @property
    def adapter_name(self) -> str:
        return next(iter(self.peft_config))  # the one adapter

    @property
    def settings(self) -> ExpertLoraConfig:
        return self.peft_config[self.adapter_name]

    @property
    def gate(self) -> nn.Linear | None:
        return self.expert_gate[self.adapter_name] if self.settings.gated else None

    @property
    def projector(self) -> nn.Module | None:
        return self.behaviour_projector[self.adapter_name] if self.settings.projector_input_size else None

    @property
    def distill_head(self) -> nn.Module | None:
        return self.user_distill_head[self.adapter_name] if self.settings.distill_output_size else None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: ``lora`` (the experts), ``gate``, ``projector``, and ``distill_head``
        where there is one."""
        groups = {"lora": [], "gate": [], "projector": []}
        if self.settings.distill_output_size:
            groups["distill_head"] = []
        roles = {"expert_gate.": "gate", "behaviour_projector.": "projector", "user_distill_head.": "distill_head"}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                groups[next((role for part, role in roles.items() if part in name), "lora")].append(parameter)
        return groups

    # ------------------------------------------------------------------------------------ gate
    def expert_weights(self, gate_input: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` mixture weights ``softmax(W z / T)``, in fp32."""
        with torch.autocast(gate_input.device.type, enabled=False):
            return torch.softmax(self.gate(gate_input.float()) / self.settings.gate_temperature, dim=-1)

    def distilled_representation(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, distill_output_size]``: the distillation head on ``[N, hidden]`` hidden states of the LLM, in fp32."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.distill_head(hidden.float())

    def rank_weights(self, gate_input: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, r]`` factors on each example's rank-``r`` activation (expert weights repeated, times the scaling)."""
        if not self.settings.gated:
            return None
        if gate_input is None:
            raise ValueError(f"Expert LoRA with {self.settings.num_experts} experts needs a gate input per example.")
        weights = self.expert_weights(gate_input).repeat_interleave(self.settings.expert_rank, dim=-1)
        return weights * self.settings.gate_scale

    def decoder_kwargs(self, gate_input: torch.Tensor | None) -> dict:
        """Keyword arguments that route one call of the decoder (or of the causal LM) by ``gate_input``."""
        weights = self.rank_weights(gate_input)
        return {} if weights is None else {ROUTING_KWARG: weights}

    @contextmanager
    def _one_call(self):
        if self.routing is None:
            yield
        else:
            with self.routing.call():
                yield

    # ------------------------------------------------------------------------------- calling
    def forward(self, *args, gate_input: torch.Tensor | None = None, **kwargs):
        with self._one_call():
            return self.model(*args, **self.decoder_kwargs(gate_input), **kwargs)

    def decode(self, gate_input: torch.Tensor | None = None, **decoder_inputs):
        """The decoder alone (hidden states, no LM head), routed by ``gate_input``."""
        with self._one_call():
            return self.model.get_decoder()(**decoder_inputs, **self.decoder_kwargs(gate_input))

    @torch.no_grad()
    def generate(self, *args, gate_input: torch.Tensor | None = None, **kwargs):
        """Hugging Face generation, each example through its own mixture. Always eager: generation's KV cache is
        addressed per layer index, which would specialise the compiled layer graph once per layer."""
        weights = self.rank_weights(gate_input)
        with torch.compiler.set_stance("force_eager"):
            if weights is None:
                return self.model.generate(*args, **kwargs)
            with self._one_call(), self.routing.generating(weights):
                return self.model.generate(*args, **kwargs)

    def compile_decoder(self, **compile_kwargs) -> None:
        """Compile every decoder layer in place (see the module docstring); generation stays eager."""
        for layer in self.model.get_decoder().layers:
            layer.compile(**compile_kwargs)
