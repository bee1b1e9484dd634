"""Validation-only hyper-parameter selection: the ``tune`` section of a grid and the choice of trials.

::

    tune:
      seeds: [2020]                          # seeds whose validation score decides (default: the first)
      space:                                 # per model: every model gets the same number of trials
        SASRec: {learning_rate: [1e-3, 3e-3], train_batch_size: [256, 2048]}
        iLoRA: {learning_rate: [8e-4, 1.6e-3, 3.2e-3, 6.4e-3]}
      # or one space shared by ``models`` (default: every model of the grid):
      # space: {learning_rate: [4e-4, 8e-4, 1.6e-3]}
      # allow_unequal_budgets: true          # accept spaces of different sizes (or untuned models)

Every tuned model first runs one *trial* per combination of its space's values on each dataset and each
tuning seed; per (model, dataset) the combination with the best mean validation score (RecBole's
``valid_metric`` at the early-stopping checkpoint) wins, and every seed of that model on that dataset
then runs with it. Test results play no part in the choice. A trial with the chosen values *is* that
seed's final cell (same settings, same hash), so it is not run twice.

A fair comparison gives every model the same tuning budget: the grid refuses spaces with different
numbers of combinations -- a model without a space counts as one -- unless ``allow_unequal_budgets``
says otherwise.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from recbole_ilora.leaderboard.store import record_key


@dataclass
class TuneSpec:
    """A grid's ``tune`` section, validated and normalised (see ``GridSpec``): one space per tuned model."""

    seeds: list[int]
    spaces: dict[str, dict[str, list]]  # tuned model -> setting -> values, models in grid order
    allow_unequal_budgets: bool = False

    @property
    def models(self) -> list[str]:
        return list(self.spaces)

    @property
    def settings(self) -> set[str]:
        """Every setting some model tunes (the command line may not set them)."""
        return {key for space in self.spaces.values() for key in space}

    def trials(self, model: str) -> list[dict]:
        """Every combination of ``model``'s space, in the order the YAML lists them (none if untuned)."""
        space = self.spaces.get(model)
        if not space:
            return []
        return [dict(zip(space, values)) for values in itertools.product(*space.values())]

    def budget(self, model: str) -> int:
        """Number of settings ``model`` is run with on the tuning seeds: its trials, or 1 if untuned."""
        return math.prod(len(values) for values in self.spaces[model].values()) if model in self.spaces else 1

    def describe(self) -> str:
        return "; ".join(f"{model} over {space}" for model, space in self.spaces.items())


@dataclass
class TuningResult:
    """What ``GridSpec.choose`` found: the chosen trial per (model, dataset), and every trial's score."""

    chosen: dict[tuple[str, str], dict]
    trials: list[dict]  # model, dataset, <tuned settings>, valid_score (mean over tuning seeds), n_seeds, chosen
    incomplete: list[tuple[str, str]]  # (model, dataset) pairs with trials still unfinished or failed


def choose_trials(cells: Sequence, records: list[dict], n_seeds: int) -> TuningResult:
    """Score the tuning seeds' cells of every (model, dataset) on validation and choose per tuned pair.

    ``cells`` lists, grouped by (model, dataset), the tuning cells of tuned models (``trial`` set) and
    the tuning seeds' final cells of untuned ones (``trial`` None: listed with their one setting, no
    choice). A tuned pair gets a choice only when every one of its trials has an ``ok`` record on
    every tuning seed; trials are compared on ``best_valid_score`` averaged over those seeds, the first
    listed winning a tie.
    """
    latest = {record_key(r): r for r in records if r.get("status") == "ok"}
    rows, chosen, incomplete = [], {}, []
    for (model, dataset), group in itertools.groupby(cells, key=lambda cell: (cell.model, cell.dataset)):
        group = list(group)
        tuned = group[0].trial is not None
        scores: dict[str, list] = {}
        bigger = True
        for cell in group:
            record = latest.get(cell.key)
            label = json.dumps(cell.trial or {}, sort_keys=True)
            scores.setdefault(label, [])
            if record is not None and record.get("best_valid_score") is not None:
                scores[label].append(float(record["best_valid_score"]))
                bigger = record.get("valid_score_bigger", True)
        means = {label: float(np.mean(values)) if values else math.nan for label, values in scores.items()}
        best = None
        if not tuned:
            best = next(iter(means))  # the untuned model's only settings
        elif all(len(values) == n_seeds for values in scores.values()):
            best = (max if bigger else min)(means, key=lambda label: means[label])  # first of equal scores
            chosen[(model, dataset)] = json.loads(best)
        else:
            incomplete.append((model, dataset))
        for label, mean in means.items():
            rows.append({"model": model, "dataset": dataset, **json.loads(label), "valid_score": mean,
                         "n_seeds": len(scores[label]), "chosen": label == best})
    return TuningResult(chosen=chosen, trials=rows, incomplete=incomplete)
