"""``score_fusion``: rank by the LLM's scores and the frozen SASRec's together, the weight chosen on validation.

The LLM models read a frozen SASRec already (iLoRA's gate and behavioural tokens; with ``score_fusion`` TALLRec loads
one too). Its own ranking of the candidates is a second opinion: the score of a candidate becomes

    log_softmax(LLM scores)[c] + lambda x log_softmax(SASRec scores)[c]

both softmaxes over the user's candidates (the uniN candidates, or every item in a full ranking), SASRec's score being
RecBole's SASRec's (the sequence representation ``z`` dotted with the item's embedding). A standard late-fusion
ensemble of an LLM and a collaborative-filtering model (ours; LLM-SRec, Kim et al. 2025, arXiv:2502.13909, feeds
SASRec into the LLM instead). Each normaliser is a constant per user, so the ranking is that of
``LLM + lambda x SASRec``; the log-softmaxes put both on the scale of log-probabilities.

``lambda`` is chosen on validation from ``score_fusion_weights`` (0 among them: the choice is never worse than the
LLM alone on validation) by :func:`choose_fusion_weight`, with RecBole's own ``Trainer.evaluate`` once per weight.
The LLM's scores do not depend on ``lambda``: :class:`LLMScoreReplay` records them on the first pass and hands them
back on the next ones, so the LLM runs once; SASRec's part is recomputed, it is cheap. The quick start then tests
the LLM alone (the run's ``test_result``, unchanged) and at the chosen weight, reported apart as
``score_fusion`` (the leaderboard's "<model> + SASRec fusion" row).
"""

from __future__ import annotations

from contextlib import contextmanager
from logging import getLogger

import torch
from recbole.utils import set_color


def fuse_scores(llm_scores: torch.Tensor, sasrec_scores: torch.Tensor, weight: float,
                present: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, M]`` fused scores: log_softmax of ``llm_scores`` + ``weight`` x log_softmax of ``sasrec_scores``, both over
    the ``present`` slots of each row (all when None); ``-inf`` in the others."""

    def log_softmax(scores):
        scores = scores.float()
        return torch.log_softmax(scores if present is None else scores.masked_fill(~present, float("-inf")), dim=1)

    fused = log_softmax(llm_scores) + weight * log_softmax(sasrec_scores)
    # 0 x -inf is nan in the empty slots; a row without candidates is nan throughout.
    return fused if present is None else fused.masked_fill(~present, float("-inf"))


class LLMScoreReplay:
    """The LLM's candidate scores of each scoring call of one evaluation pass, recorded, then replayed in order.

    An evaluation loader yields the same batches in the same order on every pass (fixed candidates, no shuffling), so
    the k-th call of a later pass is the k-th of the first; the candidates of each call are checked against the
    recorded ones. Scores stay on the device they were computed on (uniN: a few floats per user).
    """

    def __init__(self):
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replaying = False
        self.position = 0

    def rewind(self) -> None:
        """Replay from the first call on (after the recording pass, or after a complete replay)."""
        if self.replaying and self.position != len(self.recorded):
            raise RuntimeError(f"LLM score replay: the last pass made {self.position} scoring calls, the recorded one "
                               f"{len(self.recorded)}.")
        self.replaying, self.position = True, 0

    def __call__(self, items: torch.Tensor, compute) -> torch.Tensor:
        """The LLM's scores of the ``[B, M]`` candidates ``items``: ``compute()`` while recording, else the recorded."""
        if not self.replaying:
            scores = compute()
            self.recorded.append((items, scores))
            return scores
        if self.position >= len(self.recorded):
            raise RuntimeError(f"LLM score replay: more scoring calls than the {len(self.recorded)} recorded.")
        recorded_items, scores = self.recorded[self.position]
        if recorded_items.shape != items.shape or not torch.equal(recorded_items, items):
            raise RuntimeError(f"LLM score replay: call {self.position} scores candidates {tuple(items.shape)} other than "
                               f"the recorded {tuple(recorded_items.shape)} (another loader or batch order?).")
        self.position += 1
        return scores


@contextmanager
def scoring_with(model, weight: float | None = None, replay: LLMScoreReplay | None = None):
    """Inside the block ``model`` scores at fusion ``weight`` (None: the LLM alone), its LLM scores through ``replay``."""
    before = model.score_fusion_weight, model.llm_score_replay
    model.score_fusion_weight, model.llm_score_replay = weight, replay
    try:
        yield
    finally:
        model.score_fusion_weight, model.llm_score_replay = before


@contextmanager
def without_generation(trainer):
    """``eval_generate`` off inside the block: generation does not depend on the scores, one run of it is enough."""
    before = trainer.config["eval_generate"]
    trainer.config["eval_generate"] = False
    try:
        yield
    finally:
        trainer.config["eval_generate"] = before


def best_weight(valid_by_weight: dict[float, float], bigger: bool) -> float:
    """The weight of the best validation value; on ties the smallest weight (the one closest to the LLM alone)."""
    chosen = None
    for weight in sorted(valid_by_weight):
        value = valid_by_weight[weight]
        if chosen is None or (value > valid_by_weight[chosen] if bigger else value < valid_by_weight[chosen]):
            chosen = weight
    return chosen


def choose_fusion_weight(trainer, valid_data, weights, load_best_model: bool = False, model_file=None,
                         show_progress: bool = False) -> tuple[float, dict[float, float], dict]:
    """Evaluate ``valid_data`` at every weight (the LLM runs on the first pass only); returns the chosen weight, the
    validation metric by weight and the validation result at the chosen weight. ``load_best_model``/``model_file``:
    as ``Trainer.evaluate``, applied before the first pass."""
    model, metric = trainer.model, trainer.config["valid_metric"].lower()
    replay = LLMScoreReplay()
    results = {}
    with without_generation(trainer):
        for index, weight in enumerate(sorted({float(w) for w in weights})):
            if index:
                replay.rewind()
            with scoring_with(model, weight, replay):
                results[weight] = trainer.evaluate(valid_data, load_best_model=load_best_model and index == 0,
                                                   model_file=model_file, show_progress=show_progress)
    valid_by_weight = {weight: float(result[metric]) for weight, result in results.items()}
    chosen = best_weight(valid_by_weight, trainer.config["valid_metric_bigger"])
    table = ", ".join(f"{weight:g}: {value:.4f}" for weight, value in valid_by_weight.items())
    getLogger().info(set_color("score fusion", "blue") + f": valid {metric} by SASRec weight {{{table}}}; chosen {chosen:g}")
    return chosen, valid_by_weight, results[chosen]
