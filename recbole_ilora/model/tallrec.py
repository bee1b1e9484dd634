r"""TALLRec: LoRA instruction tuning on text-only prompts.

Reference:
    Keqin Bao, Jizhi Zhang, Yang Zhang, Wenjie Wang, Fuli Feng, Xiangnan He.
    "TALLRec: An Effective and Efficient Tuning Framework to Align Large Language Model with
    Recommendation." RecSys 2023. arXiv:2305.00447.

As in the LLaRA/iLoRA papers' comparison: titles only (no behavioural tokens, no SASRec), one LoRA,
the same prompts, candidates and scoring as :class:`iLoRA` (``properties/model/TALLRec.yaml``).
"""

from recbole_ilora.model.ilora import iLoRA


class TALLRec(iLoRA):
    pass
