"""What iLoRA's gate does with the user clusters: expert weights per cluster, and how spread the gate is.

For every user, ``w = model.expert_weights(z)`` (``[K]``, sums to one) with ``z`` the frozen SASRec's
representation of the user's last training sample. Per cluster: mean and standard deviation of each
expert's weight. Over all users: the mean per-user entropy ``H(w_u) / log K`` (0: each user uses one
expert, 1: each user mixes all experts equally) and the entropy of the mean mixture ``H(mean_u w_u) /
log K`` (0: everyone uses the same expert, 1: the experts are used equally often overall). The gate is
*collapsed* when every user puts (nearly) all weight on one and the same expert: the mixture is then
one plain LoRA of rank r/K and iLoRA has lost its instance-wise adaptation.
"""

from __future__ import annotations

import numpy as np
import torch

# Mean normalised per-user entropy below which a gate whose users all share one top expert is collapsed.
COLLAPSE_ENTROPY = 0.05


@torch.no_grad()
def gate_weights(model, representations: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[U, K]`` gate weights of ``model`` for the representations ``[U, d]`` (CPU, float64)."""
    outputs = [
        model.expert_weights(chunk.to(model.device)).double().cpu()
        for chunk in representations.split(batch_size)
    ]
    return torch.cat(outputs)


def normalised_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``[..., K]`` weights divided by ``log K`` (in [0, 1]; 0 log 0 = 0)."""
    num_experts = weights.shape[-1]
    terms = torch.where(weights > 0, weights * torch.log(weights.clamp(min=torch.finfo(weights.dtype).tiny)), 0.0)
    return -terms.sum(-1) / np.log(num_experts)


def gate_statistics(weights: torch.Tensor, labels: np.ndarray, num_clusters: int,
                    collapse_entropy: float = COLLAPSE_ENTROPY) -> dict:
    """Per-cluster mean/std of each expert's weight, the gate's entropies and whether it collapsed.

    ``weights``: ``[U, K]`` gate weights; ``labels``: ``[U]`` cluster of each user. Plain Python numbers.
    """
    weights = weights.double()
    labels_tensor = torch.as_tensor(labels, dtype=torch.long)
    one_hot = torch.nn.functional.one_hot(labels_tensor, num_clusters).double()  # [U, C]
    sizes = one_hot.sum(0)
    mean = (one_hot.T @ weights) / sizes.clamp(min=1)[:, None]  # [C, K]
    variance = (one_hot.T @ weights.square()) / sizes.clamp(min=1)[:, None] - mean.square()
    std = variance.clamp(min=0).sqrt()  # population std within each cluster

    per_user = normalised_entropy(weights)
    mixture = normalised_entropy(weights.mean(0))
    top_expert = weights.argmax(1)
    top_share = torch.bincount(top_expert, minlength=weights.shape[1]).double() / len(weights)
    collapsed = bool(per_user.mean() < collapse_entropy and top_share.max() == 1.0)
    return {
        "num_experts": int(weights.shape[1]),
        "cluster_mean": mean.tolist(),
        "cluster_std": std.tolist(),
        "mean_user_entropy": float(per_user.mean()),
        "max_user_entropy": float(per_user.max()),
        "mixture_entropy": float(mixture),
        "top_expert_share": top_share.tolist(),
        "cluster_spread": float((mean.max(0).values - mean.min(0).values).max()) if num_clusters > 1 else 0.0,
        "collapsed": collapsed,
        "verdict": _verdict(collapsed, int(top_expert[0]), float(per_user.mean()), float(mixture)),
    }


def _verdict(collapsed: bool, expert: int, user_entropy: float, mixture_entropy: float) -> str:
    if collapsed:
        return (f"COLLAPSED: every user puts (nearly) all weight on expert {expert} (mean normalised per-user "
                f"entropy {user_entropy:.3f}); the model acts as one LoRA of rank r/K, with no instance-wise mixing.")
    if mixture_entropy < COLLAPSE_ENTROPY:
        return (f"nearly collapsed: the average mixture is concentrated on one expert (normalised entropy of "
                f"the mean mixture {mixture_entropy:.3f}), though some users differ.")
    return (f"not collapsed: mean normalised per-user entropy {user_entropy:.3f}, entropy of the mean mixture "
            f"{mixture_entropy:.3f}.")
