r"""The paper's two analyses, from trained checkpoints: gradient conflict between user groups, and the gate.

Reference:
    Xiaoyu Kong, Jiancan Wu, An Zhang, Leheng Sheng, Hui Lin, Xiang Wang, Xiangnan He.
    "Customizing Language Models with Instance-wise LoRA for Sequential Recommendation." NeurIPS 2024.
    arXiv:2408.10159.

iLoRA's argument rests on two observations. (a) With one LoRA shared by all users (LLaRA), the
gradients of dissimilar user groups point in different directions (the paper's Figure 1: cosine
similarity of the LoRA gradients of user clusters formed in SASRec's representation space); a shared
adapter must compromise between them. (b) iLoRA's gate gives different groups different mixtures of
its LoRA experts. :func:`analyze` (``python -m recbole_ilora.analysis``) computes, from one or more
checkpoints of one dataset (LLaRA and/or iLoRA; TALLRec too, after a model with a SASRec):

1. **clusters** (:mod:`.clustering`): KMeans (``random_state`` = the run's seed, fixed ``n_init``) on the
   first checkpoint's frozen-SASRec representation of every training user's last training sample;
   the same clusters serve every model, and each other model's representations are checked against it;
2. **gradient similarity** (:mod:`.gradients`): per cluster, the gradient of the training loss w.r.t. the
   LoRA parameters on a fixed, seeded sample of the cluster's training prompts (eval mode, curriculum
   off, prompt RNG seeded per cluster), and the clusters' cosine-similarity matrix -- on all LoRA
   parameters (``mixed``) and, for iLoRA, on each expert's rows of ``A`` and columns of ``B``;
3. **gate** (:mod:`.gate`): per cluster, mean and std of each expert's weight; the gate's entropy per
   user and of the mean mixture (normalised by ``log K``), and a plain verdict when it has collapsed;
4. **test metrics per cluster** (:mod:`.cluster_metrics`): RecBole's test evaluation of each model, its
   per-user HR@1 and NDCG@5 averaged within each cluster.

Everything lands in one folder (:mod:`.report`): heatmaps, bar charts, CSV and Markdown tables,
``summary.json`` (plain numbers) and ``summary.md``.
"""

from recbole_ilora.analysis.pipeline import analyze

__all__ = ["analyze"]
