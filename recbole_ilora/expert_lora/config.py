"""Settings of the expert LoRA, validated once.

iLoRA splits a rank-``r`` LoRA pair into ``K`` experts of rank ``r/K`` -- rows of ``A``, columns of ``B``
-- mixed per example: ``ΔW x = s · Σ_k w_k B_k A_k x`` with gate weights ``w = softmax(W z / T)``.

Scaling ``s``: peft uses ``alpha / r``. The authors scale each expert by ``alpha / (r/K)``, ``K`` times
peft's; with gate weights near ``1/K`` this restores plain LoRA's magnitude. ``expert_scaling:
per_expert`` (default, the authors') multiplies the gate weights by ``K``; ``peft`` keeps peft's. For
``K = 1`` both are exactly plain peft LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPERT_SCALINGS = ("per_expert", "peft")
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLoraConfig:
    rank: int = 8  # total LoRA rank r, split into num_experts experts of rank r/K
    alpha: float = 32.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    num_experts: int = 4  # K; 1 is plain LoRA (LLaRA, TALLRec)
    expert_scaling: str = "per_expert"
    gate_temperature: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.num_experts < 1 or self.rank < 1 or self.rank % self.num_experts:
            experts = max(1, self.num_experts)
            raise ValueError(
                f"lora_rank ({self.rank}) must be a positive multiple of num_experts ({self.num_experts} >= 1): each "
                f"expert gets rank lora_rank/num_experts. Choose e.g. lora_rank={experts * max(1, self.rank // experts)}."
            )
        if self.expert_scaling not in EXPERT_SCALINGS:
            raise ValueError(f"expert_scaling must be one of {EXPERT_SCALINGS}, got {self.expert_scaling!r}.")
        if not self.gate_temperature > 0:
            raise ValueError(f"gate_temperature must be positive, got {self.gate_temperature!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.dropout!r}.")
        if not self.target_modules:
            raise ValueError("lora_target_modules is empty: name the LLM's linear layers to adapt (e.g. q_proj, v_proj).")

    @classmethod
    def from_config(cls, config) -> "ExpertLoraConfig":
        """Read the ``lora_*``, ``num_experts``, ``expert_scaling`` and ``gate_temperature`` settings."""
        return cls(
            rank=int(config["lora_rank"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config["lora_dropout"]),
            target_modules=tuple(config["lora_target_modules"]),
            num_experts=int(config["num_experts"]),
            expert_scaling=config["expert_scaling"],
            gate_temperature=float(config["gate_temperature"]),
        )

    @property
    def expert_rank(self) -> int:
        return self.rank // self.num_experts

    @property
    def gated(self) -> bool:
        return self.num_experts > 1

    @property
    def gate_scale(self) -> float:
        """Factor on the gate weights: ``K`` under per-expert scaling (see the module docstring), else 1."""
        return float(self.num_experts) if self.expert_scaling == "per_expert" else 1.0

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
