"""Cosine similarity between user clusters' gradients on the LoRA parameters (the paper's Figure 1).

For cluster ``c`` the gradient is ``g_c = ∇ L_c``, ``L_c`` the sample-weighted mean of the training
loss (``model.calculate_loss``) over a fixed sample of the cluster's training prompts, taken w.r.t.
``model.parameter_groups()["lora"]``. The model is in eval mode (no dropout), with
``training_progress = 1`` (LLaRA's curriculum never drops the behavioural tokens) and the global torch
RNG, which draws the candidates and templates of every prompt, seeded per (cluster, batch): models
analysed together see the same prompts. The similarity of clusters ``i, j`` is ``cos(g_i, g_j)``.

The gradients are compared on several *parts* of the LoRA parameters: ``mixed`` is all of them; with
``K > 1`` experts, ``expert_k`` is expert ``k``'s share -- in every adapted layer, rows
``k·r/K … (k+1)·r/K - 1`` of ``lora_A`` ``[r, in]`` and the same columns of ``lora_B`` ``[out, r]``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from recbole_ilora.analysis.clustering import collate_rows
from recbole_ilora.utils import isolated_rng

MIXED = "mixed"


def expert_part_names(num_experts: int) -> list[str]:
    return [MIXED] + ([f"expert_{k}" for k in range(num_experts)] if num_experts > 1 else [])


def named_lora_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The LoRA parameters of ``model.parameter_groups()`` with their names (A or B is read from the name)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [(names[id(parameter)], parameter) for parameter in model.parameter_groups()["lora"]]


@contextmanager
def _seeded(seed: int, cluster: int, batch: int):
    """The global torch RNG seeded by (seed, cluster, batch); every global stream restored afterwards.

    Per batch, not per cluster: a model that draws one random number more per batch (TALLRec has no
    curriculum draw) still gets the same candidates and templates as the others.
    """
    with isolated_rng():
        torch.manual_seed(int(np.random.SeedSequence([seed, cluster, batch]).generate_state(1)[0]))
        yield


def cluster_gradients(model, loader, cluster_rows: list[np.ndarray], seed: int, batch_size: int,
                      show_progress: bool = False) -> list[list[torch.Tensor]]:
    """For each cluster, the LoRA gradient (one CPU fp32 tensor per parameter) of its mean loss on its rows.

    Rows are the ``loader``'s samples, assembled by its ``collate_fn``; batches of ``batch_size``
    samples, each batch's gradient weighted by its share of the cluster's samples.
    """
    named = named_lora_parameters(model)
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable LoRA parameters to take gradients of.")
    parameters = [parameter for _, parameter in named]
    device = torch.device(model.device)
    mode_before, progress_before = model.training, model.training_progress
    model.eval()
    model.training_progress = 1.0
    gradients = []
    try:
        progress = tqdm(cluster_rows, desc="Cluster gradients", ncols=100, disable=not show_progress)
        for cluster, rows in enumerate(progress):
            if len(rows) == 0:
                raise ValueError(f"Cluster {cluster} has no training samples to take a gradient on.")
            total = [torch.zeros_like(parameter, dtype=torch.float32) for parameter in parameters]
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                interaction = collate_rows(loader, batch).to(device)
                with _seeded(seed, cluster, start // batch_size):
                    loss = model.calculate_loss(interaction) * (len(batch) / len(rows))
                for accumulated, gradient in zip(total, torch.autograd.grad(loss, parameters, materialize_grads=True)):
                    accumulated += gradient.float()
            gradients.append([gradient.cpu() for gradient in total])
    finally:
        model.train(mode_before)
        model.training_progress = progress_before
    return gradients


def gram_matrices(names: list[str], gradients: list[list[torch.Tensor]], rank: int,
                  num_experts: int) -> dict[str, torch.Tensor]:
    """``{part: [C, C] float64 Gram matrix}`` of the clusters' gradients on each part (mixed, expert_k)."""
    num_clusters = len(gradients)
    grams = {part: torch.zeros(num_clusters, num_clusters, dtype=torch.float64)
             for part in expert_part_names(num_experts)}
    share = rank // num_experts
    for index, name in enumerate(names):
        stacked = torch.stack([cluster[index] for cluster in gradients]).double()  # [C, *shape]
        flat = stacked.reshape(num_clusters, -1)
        grams[MIXED] += flat @ flat.T
        if num_experts == 1 or not ("lora_A" in name or "lora_B" in name):
            continue
        if "lora_A" in name:  # [C, r, in]: expert k owns rows k*share ... (k+1)*share - 1
            _check_rank(name, stacked.shape[1], rank)
            per_expert = stacked.reshape(num_clusters, num_experts, -1)
        else:  # [C, out, r]: expert k owns the same columns
            _check_rank(name, stacked.shape[2], rank)
            per_expert = stacked.reshape(num_clusters, stacked.shape[1], num_experts, share).transpose(1, 2)
            per_expert = per_expert.reshape(num_clusters, num_experts, -1)
        expert_grams = torch.einsum("ckx,dkx->kcd", per_expert, per_expert)
        for expert in range(num_experts):
            grams[f"expert_{expert}"] += expert_grams[expert]
    return grams


def _check_rank(name: str, found: int, rank: int) -> None:
    if found != rank:
        raise ValueError(
            f"{name} has rank {found}, but the config's lora_rank is {rank}: the expert split would be wrong."
        )


def cosine_similarity(gram: torch.Tensor) -> np.ndarray:
    """Cosine similarities from a Gram matrix (NaN where a gradient is exactly zero)."""
    gram = (gram + gram.T) / 2
    norms = gram.diagonal().clamp(min=0).sqrt()
    similarity = (gram / (norms[:, None] * norms[None, :])).numpy()  # 0/0 -> NaN
    np.fill_diagonal(similarity, np.where(norms.numpy() > 0, 1.0, np.nan))
    return similarity


def similarity_matrices(model, gradients: list[list[torch.Tensor]], rank: int) -> dict[str, np.ndarray]:
    names = [name for name, _ in named_lora_parameters(model)]
    grams = gram_matrices(names, gradients, rank, model.num_experts)
    return {part: cosine_similarity(gram) for part, gram in grams.items()}


def off_diagonal_summary(similarity: np.ndarray) -> dict:
    """Mean, minimum and share of negative cosines between distinct clusters."""
    values = similarity[~np.eye(len(similarity), dtype=bool)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean_off_diagonal": None, "min_off_diagonal": None, "share_negative": None}
    return {"mean_off_diagonal": float(values.mean()), "min_off_diagonal": float(values.min()),
            "share_negative": float((values < 0).mean())}
