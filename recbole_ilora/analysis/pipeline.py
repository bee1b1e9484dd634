"""``analyze``: the paper's two analyses and per-cluster test metrics from trained checkpoints, in one call.

Order of work: rebuild the data once (from the first checkpoint's config; every other checkpoint must
share it), then for each checkpoint in turn build its model, and -- with the first one -- cluster the
users and fix each cluster's sample of training prompts; then gradients, gate and test evaluation of
that model, and free it before the next (two LLMs are never held at once).
"""

from __future__ import annotations

import gc
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from recbole_ilora.analysis import report
from recbole_ilora.analysis.cluster_metrics import REPORTED_METRICS, evaluate_per_user, evaluated_users, metrics_by_cluster
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
from recbole_ilora.analysis.gradients import cluster_gradients, off_diagonal_summary, similarity_matrices
from recbole_ilora.analysis.loading import build_data, build_model, check_same_data, load_run, run_label

# Representations of two models' gate encoders count as the same within this tolerance.
SAME_REPRESENTATION_ATOL = 1e-5


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
    ``batch_size``: samples per forward for representations and gradients (default: the run's
    ``train_batch_size``). Returns the summary written to ``out_dir/summary.json``.
    """
    if not checkpoints:
        raise ValueError("Give at least one checkpoint (--checkpoint=PATH).")
    if samples_per_cluster < 1:
        raise ValueError(f"samples_per_cluster must be at least 1, got {samples_per_cluster}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(path, overrides) for path in checkpoints]
    for run in runs[1:]:
        check_same_data(runs[0], run)
    labels: list[str] = []
    for run in runs:
        labels.append(run_label(run, set(labels)))

    reference = runs[0].config
    dataset, train_data, _, test_data = build_data(reference)
    seed = int(reference["seed"])
    batch_size = int(batch_size or reference["train_batch_size"])
    train_samples = partial(collate_rows, train_data)
    users, last_rows = last_training_rows(train_data._dataset)

    clusters = user_cluster = reference_representations = None
    samples: list[np.ndarray] = []
    representation_check, similarities, gradient_summary, gates, metrics, test_results, num_experts = ({} for _ in range(7))
    for run, label in zip(runs, labels):
        model = build_model(run, train_data)
        has_encoder = hasattr(model, "gate_encoder")  # TALLRec has no frozen SASRec
        num_experts[label] = model.num_experts
        representations = None
        if has_encoder:
            representations = sequence_representations(model, train_samples, last_rows, batch_size, show_progress)
        if clusters is None:
            if representations is None:
                raise ValueError(
                    f"{run.path} is a {run.model_name} checkpoint, which has no frozen SASRec to cluster users with: "
                    f"give an iLoRA or LLaRA checkpoint first."
                )
            clusters = cluster_users(users, representations, num_clusters, seed)
            reference_representations = representations
            user_cluster, source = _assign_all_users(model, clusters, test_data, dataset.user_num, batch_size)
            samples = [sample_rows(rows, samples_per_cluster, seed, cluster)
                       for cluster, rows in enumerate(rows_by_cluster(train_data._dataset, clusters))]
            assigned = np.flatnonzero(user_cluster >= 0)
            report.write_clusters(out, dataset.id2token(dataset.uid_field, assigned), user_cluster[assigned], source[assigned])
        if representations is not None:
            difference = float((representations - reference_representations).abs().max())
            representation_check[label] = {"same": difference <= SAME_REPRESENTATION_ATOL, "max_abs_difference": difference}

        gradients = cluster_gradients(model, train_data, samples, seed, batch_size, show_progress)
        similarities[label] = similarity_matrices(model, gradients, run.config["lora_rank"])
        gradient_summary[label] = {part: {**off_diagonal_summary(matrix), "matrix": matrix}
                                   for part, matrix in similarities[label].items()}
        if model.num_experts > 1:
            weights = gate_weights(model, representations, batch_size)
            gates[label] = gate_statistics(weights, clusters.labels, clusters.num_clusters, collapse_entropy)

        result, vectors, evaluated = evaluate_per_user(run.config, model, test_data, show_progress)
        test_results[label] = result
        metrics[label] = metrics_by_cluster(vectors, user_cluster[evaluated], clusters.num_clusters)
        del model, gradients
        _release_memory(run.config["device"])

    files, tables = report.write_tables_and_figures(out, similarities, gates, clusters.sizes().tolist(), metrics,
                                                    REPORTED_METRICS)
    summary = {
        "dataset": reference["dataset"],
        "checkpoints": [{"label": label, "path": str(run.path), "model": run.model_name,
                         "num_experts": num_experts[label]} for run, label in zip(runs, labels)],
        "clustering": {
            "source": labels[0], "num_clusters": clusters.num_clusters, "seed": seed, "n_init": KMEANS_N_INIT,
            "num_users": len(clusters.users), "sizes": clusters.sizes().tolist(), "inertia": float(clusters.kmeans.inertia_),
            "representation": "frozen SASRec sequence_representation of each user's last training sample",
            "representation_check": representation_check,
            "test_users_without_training_samples": int((source == "test sequence").sum()),
        },
        "samples_per_cluster": samples_per_cluster,
        "samples_used": [len(rows) for rows in samples],
        "gradient_similarity": gradient_summary,
        "gate": gates,
        "test_metrics": {label: {**metrics[label], "recbole_result": test_results[label]} for label in labels},
        "files": ["clusters.csv"] + [path.name for path in files] + ["summary.json", "summary.md"],
    }
    report.write_summary(out, summary, tables)
    return report.plain(summary)


def _assign_all_users(model, clusters: UserClusters, test_data, num_users: int, batch_size: int):
    """Cluster of every user id (-1: none) and where it came from.

    Training users have their KMeans label. A test user without a training sample (possible under
    other splits than leave-one-out) gets the nearest centroid of their test sequence's representation.
    """
    user_cluster = np.full(num_users, -1, dtype=np.int64)
    source = np.full(num_users, "", dtype=object)
    user_cluster[clusters.users], source[clusters.users] = clusters.labels, "last training sample"
    test_dataset = test_data._dataset
    test_users = test_dataset.inter_feat[test_dataset.uid_field].numpy()
    missing_rows = np.flatnonzero(user_cluster[test_users] < 0)
    if len(missing_rows):
        _, first = np.unique(test_users[missing_rows], return_index=True)
        rows = missing_rows[first]
        representations = sequence_representations(model, test_dataset.__getitem__, rows, batch_size)
        user_cluster[test_users[rows]] = clusters.kmeans.predict(representations.double().numpy())
        source[test_users[rows]] = "test sequence"
    if (user_cluster[evaluated_users(test_data)] < 0).any():
        raise RuntimeError("Some evaluated users have no cluster: the test loader lists users the test dataset lacks.")
    return user_cluster, source


def _release_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
