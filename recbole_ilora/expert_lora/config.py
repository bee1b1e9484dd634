"""Settings of the expert LoRA method: a peft ``LoraConfig`` with the experts, the gate, the projector and the
optional distillation head.

iLoRA splits a rank-``r`` LoRA pair into ``K`` experts of rank ``r/K`` -- rows of ``A``, columns of ``B``
-- mixed per example: ``ΔW x = s · Σ_k w_k B_k A_k x`` with gate weights ``w = softmax(W z / T)``.

Scaling ``s``: peft uses ``lora_alpha / r``. The authors scale each expert by ``lora_alpha / (r/K)``,
``K`` times peft's; with gate weights near ``1/K`` this restores plain LoRA's magnitude. ``expert_scaling:
per_expert`` (default, the authors') multiplies the gate weights by ``K``; ``peft`` keeps peft's. For
``K = 1`` both are exactly plain peft LoRA.

Saved by ``save_pretrained`` as ``adapter_config.json`` like every peft config; ``peft_type`` is
``EXPERT_LORA`` (:mod:`recbole_ilora.expert_lora` registers it with peft).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft import LoraConfig

EXPERT_SCALINGS = ("per_expert", "peft")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ExpertLoraType(str, enum.Enum):
    """The peft type of this method. peft's own ``PeftType`` is closed; a ``str`` enum whose name equals its
    value is looked up in peft's registries exactly like one of its members."""

    EXPERT_LORA = "EXPERT_LORA"


@dataclass
class ExpertLoraConfig(LoraConfig):
    """``LoraConfig`` (``r`` is the total rank) plus the mixture: ``num_experts`` experts of rank
    ``r / num_experts``, a gate on ``gate_input_size``-wide inputs, optionally a projector that maps
    ``projector_input_size``-wide behaviour vectors into the LLM's input embeddings (LLaRA's hybrid prompt), and
    optionally a head that maps the LLM's hidden states to ``distill_output_size`` (the distillation of SASRec's user representation)."""

    num_experts: int = field(default=4, metadata={"help": "K experts mixed per example; 1 is plain LoRA"})
    expert_scaling: str = field(default="per_expert", metadata={"help": "per_expert (authors) or peft"})
    gate_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the gate"})
    gate_input_size: int | None = field(default=None, metadata={"help": "width of the gate input z (K > 1)"})
    projector_input_size: int | None = field(
        default=None, metadata={"help": "width of the behaviour vectors projected into the LLM; None: no projector"}
    )
    distill_output_size: int | None = field(
        default=None, metadata={"help": "width of the representation the LLM's hidden state is distilled "
                                        "into; None: no distillation head"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ExpertLoraType.EXPERT_LORA
        if isinstance(self.target_modules, (list, set, tuple)):
            self.target_modules = sorted(self.target_modules)  # peft keeps a set: an order for JSON and hashing
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1 (1 is plain LoRA), got {self.num_experts}.")
        if self.r < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.r}.")
        if self.r % self.num_experts:
            divisors = [d for d in range(1, self.r + 1) if self.r % d == 0]
            closest = min(divisors, key=lambda d: (abs(d - self.num_experts), -d))
            multiple = -(-self.r // self.num_experts) * self.num_experts
            raise ValueError(
                f"lora_rank ({self.r}) must be a multiple of num_experts ({self.num_experts}): each expert gets rank "
                f"lora_rank/num_experts. Choose e.g. num_experts={closest} or lora_rank={multiple}."
            )
        if self.expert_scaling not in EXPERT_SCALINGS:
            raise ValueError(f"expert_scaling must be one of {EXPERT_SCALINGS}, got {self.expert_scaling!r}.")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be positive, got {self.gate_temperature!r}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}.")
        if not self.target_modules:
            raise ValueError("lora_target_modules is empty: name the LLM's linear layers to adapt (e.g. q_proj, v_proj).")
        if self.distill_output_size is not None and not self.distill_output_size > 0:
            raise ValueError(f"distill_output_size must be positive (or None: no head), got {self.distill_output_size!r}.")
        if self.gated and not (self.gate_input_size or 0) > 0:
            raise ValueError(f"{self.num_experts} experts need a gate: set gate_input_size, the width of its input.")

    @classmethod
    def from_config(cls, config, gate_input_size: int | None = None, projector_input_size: int | None = None,
                    distill_output_size: int | None = None) -> "ExpertLoraConfig":
        """From a RecBole config's ``lora_*``, ``num_experts``, ``expert_scaling`` and ``gate_temperature``."""
        return cls(
            r=int(config["lora_rank"]),
            lora_alpha=float(config["lora_alpha"]),
            lora_dropout=float(config["lora_dropout"]),
            target_modules=list(config["lora_target_modules"]),
            num_experts=int(config["num_experts"]),
            expert_scaling=config["expert_scaling"],
            gate_temperature=float(config["gate_temperature"]),
            gate_input_size=gate_input_size if int(config["num_experts"]) > 1 else None,
            projector_input_size=projector_input_size,
            distill_output_size=distill_output_size,
            bias="none",
            task_type="CAUSAL_LM",
        )

    @property
    def expert_rank(self) -> int:
        return self.r // self.num_experts

    @property
    def gated(self) -> bool:
        return self.num_experts > 1

    @property
    def gate_scale(self) -> float:
        """Factor on the gate weights: ``K`` under per-expert scaling (see the module docstring), else 1."""
        return float(self.num_experts) if self.expert_scaling == "per_expert" else 1.0
