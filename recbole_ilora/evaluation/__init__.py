"""Evaluation on top of RecBole's evaluator: fixed uniN candidates and per-user metric vectors.

- :mod:`~recbole_ilora.evaluation.negatives`: ``fixed_eval_negatives`` (on by default) makes every
  user's evaluation candidates a function of (seed, phase, user), the same for every model, every
  evaluation and every process count.
- :mod:`~recbole_ilora.evaluation.per_user`: :class:`RecordingEvaluator` and :func:`per_user_metrics`,
  the per-user vectors behind RecBole's means (paired significance tests).
- :mod:`~recbole_ilora.evaluation.generation`: the authors' protocol (greedy generation, string match),
  reported besides the ranking metrics with ``eval_generate``.
"""

from recbole_ilora.evaluation.generation import generation_metrics
from recbole_ilora.evaluation.negatives import PerUserSeededNegatives, prepare_eval_loaders
from recbole_ilora.evaluation.per_user import RecordingEvaluator, per_user_metrics

__all__ = ["generation_metrics", "PerUserSeededNegatives", "RecordingEvaluator", "per_user_metrics", "prepare_eval_loaders"]
