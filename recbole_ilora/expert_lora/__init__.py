"""Instance-wise mixture of LoRA experts on stock peft, organised like a peft tuner.

- :mod:`.config`: :class:`ExpertLoraConfig`, the validated settings (rank, experts, scaling, temperature).
- :mod:`.layer`: :class:`ExpertRouting`, the per-example scaling applied inside every adapted layer.
- :mod:`.model`: :class:`ExpertLoraModel`, a causal LM with peft LoRA split into experts, its gate, and
  the one decoder call that routes each example (compiled with ``torch.compile`` on request).
"""

from recbole_ilora.expert_lora.config import EXPERT_SCALINGS, ExpertLoraConfig
from recbole_ilora.expert_lora.layer import ExpertRouting, attach_routing
from recbole_ilora.expert_lora.model import ExpertLoraModel

__all__ = ["EXPERT_SCALINGS", "ExpertLoraConfig", "ExpertLoraModel", "ExpertRouting", "attach_routing"]
