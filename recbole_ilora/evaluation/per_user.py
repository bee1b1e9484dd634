"""Per-user metric vectors from RecBole's evaluation, for paired significance tests.

RecBole's :class:`~recbole.evaluator.Evaluator` averages every top-k metric over users and throws the
per-user values away. :class:`RecordingEvaluator` keeps the last ``DataStruct`` it saw, and
:func:`per_user_metrics` recomputes the per-user values with RecBole's own metric classes, so the
means of the vectors equal RecBole's reported numbers exactly.
"""

from __future__ import annotations

import inspect

import numpy as np
from recbole.evaluator import Evaluator
from recbole.evaluator.base_metric import TopkMetric
from recbole.evaluator.register import metrics_dict


class RecordingEvaluator(Evaluator):
    """RecBole's evaluator that remembers the data of its last evaluation."""

    last_struct = None

    def evaluate(self, dataobject):
        self.last_struct = dataobject
        return super().evaluate(dataobject)


def per_user_metrics(config, struct) -> dict[str, np.ndarray]:
    """``{"hit@10": array(n_users), ...}`` for every top-k metric in ``config["metrics"]``."""
    vectors: dict[str, np.ndarray] = {}
    for name in config["metrics"]:
        metric = metrics_dict[name.lower()](config)
        if not isinstance(metric, TopkMetric):
            continue  # non-top-k metrics (AUC, ...) have no per-user decomposition here
        pos_index, pos_len = metric.used_info(struct)
        wants_len = len(inspect.signature(metric.metric_info).parameters) == 2
        values = metric.metric_info(pos_index, pos_len) if wants_len else metric.metric_info(pos_index)
        for k in config["topk"]:
            vectors[f"{name.lower()}@{k}"] = np.asarray(values[:, k - 1], dtype=np.float64)
    return vectors
