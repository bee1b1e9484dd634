"""``analyze``: the paper's two analyses and per-cluster test metrics from trained checkpoints, in one call.

Order of work: rebuild the data once (from the first checkpoint's config; every other checkpoint must
share it), then for each checkpoint in turn build its model, and -- with the first one -- cluster the
users and fix each cluster's sample of training prompts; then gradients, gate and test evaluation of
that model, and free it before the next (two LLMs are never held at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from recbole_ilora.analysis import report
from recbole_ilora.analysis.cluster_metrics import (
    REPORTED_METRICS,
    evaluate_per_user,
    evaluated_users,
    metrics_by_cluster,
)
from recbole_ilora.analysis.clustering import (
    KMEANS_N_INIT,
    UserClusters,
    cluster_users,
    collate_rows,
    last_training_rows,
    rows_by_cluster,
    sample_rows,
    sequence_representations,
)
from recbole_ilora.analysis.gate import COLLAPSE_ENTROPY, gate_statistics, gate_weights
from recbole_ilora.analysis.gradients import (
    cluster_gradients,
    off_diagonal_summary,
    similarity_matrices,
)
from recbole_ilora.analysis.loading import (
    build_data,
    build_model,
    check_same_data,
    load_run,
    run_label,
)
from recbole_ilora.utils import release_device_memory

# Representations of two models' gate encoders count as the same within this tolerance.
SAME_REPRESENTATION_ATOL = 1e-5
# Sequences per forward of the frozen SASRec (a small model: large batches).
REPRESENTATION_BATCH = 1024
# How a user got their cluster (clusters.csv, column assigned_from).
LAST_TRAINING_SAMPLE, TEST_SEQUENCE = "last training sample", "test sequence"


def analyze(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    num_clusters: int = 8,
    samples_per_cluster: int = 64,
    overrides: dict | None = None,
    batch_size: int | None = None,
    collapse_entropy: float = COLLAPSE_ENTROPY,
    show_progress: bool = False,
) -> dict:
    """Analyse one or more checkpoints (e.g. LLaRA and iLoRA) of one dataset; write the results to ``out_dir``.

    ``overrides``: RecBole settings applied over every checkpoint's own (device, paths, ...);
    ``batch_size``: training prompts per forward and backward pass of the gradients (default: the run's
    ``train_batch_size``). Returns the summary written to ``out_dir/summary.json``.
    """
    if not checkpoints:
        raise ValueError("Give at least one checkpoint (--checkpoint=PATH).")
    if samples_per_cluster < 1:
        raise ValueError(f"samples_per_cluster must be at least 1, got {samples_per_cluster}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(path, overrides) for path in checkpoints]
    labels: list[str] = []
    for run in runs:
        check_same_data(runs[0], run)
        labels.append(run_label(run, set(labels)))
    reference = runs[0].config
    dataset, train_data, _, test_data = build_data(reference)
    seed = int(reference["seed"])
    batch_size = int(batch_size or reference["train_batch_size"])
    users, last_rows = last_training_rows(train_data._dataset)

    clustering, results = None, {}
    for run, label in zip(runs, labels):
        model = build_model(run, train_data)
        representations = None
        if hasattr(model, "gate_encoder"):  # TALLRec has no frozen SASRec
            representations = sequence_representations(
                model, partial(collate_rows, train_data), last_rows, REPRESENTATION_BATCH, show_progress
            )
        if clustering is None:
            if representations is None:
                raise ValueError(
                    f"{run.path} is a {run.model_name} checkpoint, which has no frozen SASRec to cluster users with: "
                    f"give an iLoRA or LLaRA checkpoint first."
                )
            clustering = _cluster(model, users, representations, train_data, test_data, num_clusters,
                                  samples_per_cluster, seed)
            known = np.flatnonzero(clustering.user_cluster >= 0)
            report.write_clusters(out, dataset.id2token(dataset.uid_field, known), clustering.user_cluster[known],
                                  clustering.source[known])
        results[label] = _analyse_model(model, run, representations, clustering, train_data, test_data, seed,
                                        batch_size, collapse_entropy, show_progress)
        del model
        release_device_memory()

    sizes = clustering.clusters.sizes().tolist()
    files, tables = report.write_tables_and_figures(
        out, {label: result.similarities for label, result in results.items()},
        {label: result.gate for label, result in results.items() if result.gate is not None}, sizes,
        {label: result.metrics for label, result in results.items()}, REPORTED_METRICS,
    )
    summary = _summary(reference["dataset"], runs, labels, results, clustering, seed, samples_per_cluster,
                       ["clusters.csv"] + [path.name for path in files] + ["summary.json", "summary.md"])
    report.write_summary(out, summary, tables)
    return report.plain(summary)


@dataclass
class Clustering:
    """The user clusters every model is analysed on, fixed by the first checkpoint."""

    clusters: UserClusters
    user_cluster: np.ndarray  # [num user ids] cluster of every user (-1: none)
    source: np.ndarray  # [num user ids] how each user was assigned
    samples: list[np.ndarray]  # each cluster's fixed sample of training rows, for its gradient
    representations: torch.Tensor  # the clustering model's representations of the training users


@dataclass
class ModelResult:
    num_experts: int
    representation_check: dict | None  # this model's SASRec representations against the clustering model's
    similarities: dict[str, np.ndarray]  # part -> [C, C] cosine similarity of cluster gradients
    gate: dict | None  # gate_statistics, for models with more than one expert
    metrics: dict  # metrics_by_cluster of the test evaluation
    test_result: dict  # RecBole's test result


def _cluster(model, users: np.ndarray, representations: torch.Tensor, train_data, test_data, num_clusters: int,
             samples_per_cluster: int, seed: int) -> Clustering:
    clusters = cluster_users(users, representations, num_clusters, seed)
    user_cluster, source = _assign_all_users(model, clusters, test_data, train_data._dataset.user_num)
    samples = [sample_rows(rows, samples_per_cluster, seed, cluster)
               for cluster, rows in enumerate(rows_by_cluster(train_data._dataset, clusters))]
    return Clustering(clusters, user_cluster, source, samples, representations)


def _analyse_model(model, run, representations, clustering: Clustering, train_data, test_data, seed: int,
                   batch_size: int, collapse_entropy: float, show_progress: bool) -> ModelResult:
    check = None
    if representations is not None:
        difference = float((representations - clustering.representations).abs().max())
        check = {"same": difference <= SAME_REPRESENTATION_ATOL, "max_abs_difference": difference}
    gradients = cluster_gradients(model, train_data, clustering.samples, seed, batch_size, show_progress)
    similarities = similarity_matrices(model, gradients, run.config["lora_rank"])
    gate = None
    if model.num_experts > 1:
        weights = gate_weights(model, representations, REPRESENTATION_BATCH)
        gate = gate_statistics(weights, clustering.clusters.labels, clustering.clusters.num_clusters,
                               collapse_entropy)
    test_result, vectors, evaluated = evaluate_per_user(run.config, model, test_data, show_progress)
    metrics = metrics_by_cluster(vectors, clustering.user_cluster[evaluated], clustering.clusters.num_clusters)
    return ModelResult(model.num_experts, check, similarities, gate, metrics, test_result)


def _summary(dataset_name: str, runs, labels: list[str], results: dict[str, ModelResult], clustering: Clustering,
             seed: int, samples_per_cluster: int, files: list[str]) -> dict:
    clusters = clustering.clusters
    return {
        "dataset": dataset_name,
        "checkpoints": [{"label": label, "path": str(run.path), "model": run.model_name,
                         "num_experts": results[label].num_experts} for run, label in zip(runs, labels)],
        "clustering": {
            "source": labels[0], "num_clusters": clusters.num_clusters, "seed": seed, "n_init": KMEANS_N_INIT,
            "num_users": len(clusters.users), "sizes": clusters.sizes().tolist(),
            "inertia": float(clusters.kmeans.inertia_),
            "representation": "frozen SASRec sequence_representation of each user's last training sample",
            "representation_check": {label: result.representation_check for label, result in results.items()
                                     if result.representation_check is not None},
            "test_users_without_training_samples": int((clustering.source == TEST_SEQUENCE).sum()),
        },
        "samples_per_cluster": samples_per_cluster,
        "samples_used": [len(rows) for rows in clustering.samples],
        "gradient_similarity": {
            label: {part: {**off_diagonal_summary(matrix), "matrix": matrix}
                    for part, matrix in result.similarities.items()}
            for label, result in results.items()
        },
        "gate": {label: result.gate for label, result in results.items() if result.gate is not None},
        "test_metrics": {label: {**result.metrics, "recbole_result": result.test_result}
                         for label, result in results.items()},
        "files": files,
    }


def _assign_all_users(model, clusters: UserClusters, test_data, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster of every user id (-1: none) and where it came from.

    Training users have their KMeans label. A test user without a training sample (possible under
    other splits than leave-one-out) gets the nearest centroid of their test sequence's representation.
    """
    user_cluster = np.full(num_users, -1, dtype=np.int64)
    source = np.full(num_users, "", dtype=object)
    user_cluster[clusters.users], source[clusters.users] = clusters.labels, LAST_TRAINING_SAMPLE
    test_dataset = test_data._dataset
    test_users = test_dataset.inter_feat[test_dataset.uid_field].numpy()
    missing_rows = np.flatnonzero(user_cluster[test_users] < 0)
    if len(missing_rows):
        _, first = np.unique(test_users[missing_rows], return_index=True)
        rows = missing_rows[first]
        representations = sequence_representations(model, test_dataset.__getitem__, rows, REPRESENTATION_BATCH)
        user_cluster[test_users[rows]] = clusters.kmeans.predict(representations.double().numpy())
        source[test_users[rows]] = TEST_SEQUENCE
    if (user_cluster[evaluated_users(test_data)] < 0).any():
        raise RuntimeError("Some evaluated users have no cluster: the test loader lists users the test dataset lacks.")
    return user_cluster, source
