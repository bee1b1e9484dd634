"""Instance-wise mixture of LoRA experts as a peft method, organised like a peft tuner.

- :mod:`.config`: :class:`ExpertLoraConfig`, a ``LoraConfig`` with the experts, the gate and the projector;
- :mod:`.layer`: :class:`ExpertRouting`, the per-example scaling inside every adapted layer;
- :mod:`.model`: :class:`ExpertLoraModel`, the tuner: peft's LoRA layers, the gate, the projector, the
  routed calls (forward, the decoder alone, generate) and regional compilation.

Importing this package registers the method with peft, so ``get_peft_model(llm, ExpertLoraConfig(...))``,
``PeftModel.save_pretrained`` and ``PeftModel.from_pretrained`` handle it like peft's own methods.
"""

from recbole_ilora.expert_lora.config import EXPERT_SCALINGS, LLAMA_PROJECTIONS, ExpertLoraConfig, ExpertLoraType
from recbole_ilora.expert_lora.layer import ROUTING_KWARG, ExpertRouting
from recbole_ilora.expert_lora.model import ExpertLoraModel


def register() -> None:
    """Enter the method in peft's registries, as ``peft.utils.register_peft_method`` does for peft's own
    methods (which only accepts members of peft's closed ``PeftType``). Idempotent."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ExpertLoraType.EXPERT_LORA
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = ExpertLoraConfig
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = ExpertLoraModel
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = ExpertLoraModel.prefix


register()

__all__ = ["EXPERT_SCALINGS", "LLAMA_PROJECTIONS", "ROUTING_KWARG", "ExpertLoraConfig", "ExpertLoraModel",
           "ExpertLoraType", "ExpertRouting", "register"]
