r"""LLaRA: hybrid item representations (titles + SASRec behavioural tokens) with one LoRA.

Reference:
    Jiayi Liao, Sihang Li, Zhengyi Yang, Jiancan Wu, Yancheng Yuan, Xiang Wang, Xiangnan He.
    "LLaRA: Large Language-Recommendation Assistant." SIGIR 2024. arXiv:2312.02445.

The baseline iLoRA improves on: the same prompts, projector and curriculum as :class:`iLoRA` with
``num_experts: 1`` (``properties/model/LLaRA.yaml``) -- a single LoRA shared by all users, no gate.
Sharing iLoRA's code path keeps the comparison about the mixture alone.
"""

from recbole_ilora.model.ilora import iLoRA


class LLaRA(iLoRA):
    pass
