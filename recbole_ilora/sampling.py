"""The candidate lists of training prompts: the target and random negatives, drawn on the batch's device."""

from __future__ import annotations

import torch


def training_candidates(target: torch.Tensor, history: torch.Tensor, num_items: int, num_candidates: int,
                        exclude_history: bool = True) -> torch.Tensor:
    """``[B, num_candidates]``: each target with ``num_candidates - 1`` distinct random items (never the target,
    nor the padding item 0, nor -- with ``exclude_history`` -- the ``[B, H]`` history), in random order."""
    weights = torch.ones(target.shape[0], num_items, device=target.device)
    weights[:, 0] = 0  # padding item
    if exclude_history:
        weights.scatter_(1, history, 0.0)
    weights.scatter_(1, target[:, None], 0.0)
    negatives = torch.multinomial(weights, num_candidates - 1, replacement=False)
    candidates = torch.cat([target[:, None], negatives], 1)
    order = torch.argsort(torch.rand(candidates.shape, device=target.device), dim=1)
    return torch.gather(candidates, 1, order)
