"""Test metrics per user cluster: RecBole's evaluation of the test loader, split by each user's cluster.

The model is evaluated by its own trainer (RecBole's ``Trainer.evaluate``: the same candidates,
scoring and metric classes as a training run's test), with :class:`RecordingEvaluator` keeping the
per-user data; :func:`per_user_metrics` turns it into one value per evaluated user, and each value is
credited to that user's cluster. Cluster means weighted by cluster sizes give back the overall metric.
"""

from __future__ import annotations

import numpy as np

from recbole_ilora.evaluation import RecordingEvaluator, per_user_metrics
from recbole_ilora.trainer import get_trainer

# Metrics of the per-cluster table, added to the config's when missing.
REPORTED_METRICS = ("hit@1", "ndcg@5")


def evaluated_users(loader) -> np.ndarray:
    """The user id behind each entry of the per-user vectors, in the order RecBole's evaluation visits them.

    uniN evaluation (and non-sequential full ranking) visits ``loader.uid_list`` in order, one entry per
    user; sequential full ranking visits the test dataset's rows in order.
    """
    uid_list = getattr(loader, "uid_list", None)
    if uid_list is not None:
        return np.asarray(uid_list)
    return loader._dataset.inter_feat[loader._dataset.uid_field].numpy()


def _ensure_reported_metrics(config) -> None:
    # Only the evaluation reads these, after the model is built (metrics and topk are part of the gate
    # encoder's cache key, so they must not change before).
    metrics = {name.lower() for name in config["metrics"]}
    for name, k in (metric.split("@") for metric in REPORTED_METRICS):
        if name not in metrics:
            config["metrics"] = list(config["metrics"]) + [{"hit": "Hit", "ndcg": "NDCG"}[name]]
            metrics.add(name)
        if int(k) not in config["topk"]:
            config["topk"] = sorted(set(config["topk"]) | {int(k)})


def evaluate_per_user(config, model, test_data, show_progress: bool = False
                      ) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """``(RecBole's test result, per-user metric vectors, user id of each vector entry)``."""
    _ensure_reported_metrics(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.evaluator = RecordingEvaluator(config)
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
    vectors = per_user_metrics(config, trainer.evaluator.last_struct)
    users = evaluated_users(test_data)
    lengths = {name: len(vector) for name, vector in vectors.items()}
    if any(length != len(users) for length in lengths.values()):
        raise RuntimeError(f"The evaluation scored {lengths} users, but the test loader lists {len(users)}.")
    return dict(result), vectors, users


def metrics_by_cluster(vectors: dict[str, np.ndarray], user_clusters: np.ndarray, num_clusters: int) -> dict:
    """``{"users": [C], "overall": {metric: mean}, "clusters": {metric: [C] means (None if empty)}}``."""
    counts = np.bincount(user_clusters, minlength=num_clusters)
    clusters = {}
    for name, vector in vectors.items():
        sums = np.bincount(user_clusters, weights=vector, minlength=num_clusters)
        clusters[name] = [float(s / n) if n else None for s, n in zip(sums, counts)]
    return {
        "users": counts.tolist(),
        "overall": {name: float(vector.mean()) for name, vector in vectors.items()},
        "clusters": clusters,
    }
