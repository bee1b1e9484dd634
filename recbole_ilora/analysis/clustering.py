"""Users grouped by the frozen SASRec's representation of their history (the space iLoRA's gate reads).

A user is represented by ``model.sequence_representation`` of their *last training sample*: the
longest history the model was trained on, which contains every earlier sample's history, and the
sample closest in time to the test one. Users are then clustered with scikit-learn's ``KMeans`` on
the raw representations (Euclidean distance, as in the paper), ``random_state`` = the run's seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

KMEANS_N_INIT = 10  # restarts: the clustering is the best of 10 seeded initialisations


@dataclass
class UserClusters:
    """Cluster of every user id (RecBole's internal ids), and the fitted KMeans."""

    users: np.ndarray  # [U] internal user ids, ascending
    labels: np.ndarray  # [U] cluster of each user
    kmeans: KMeans

    @property
    def num_clusters(self) -> int:
        return self.kmeans.n_clusters

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_clusters)

    def lookup(self, user_ids: np.ndarray) -> np.ndarray:
        """Cluster of each of ``user_ids`` (-1 for users not clustered)."""
        table = np.full(max(int(self.users.max()), int(np.max(user_ids, initial=0))) + 1, -1, dtype=np.int64)
        table[self.users] = self.labels
        return table[user_ids]


def last_training_rows(train_dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(users, rows)``: every training user (ascending) and the row of their latest training sample.

    Latest by the target's timestamp when the dataset has one, then by row (RecBole's sequential
    augmentation writes each user's samples in time order).
    """
    users = train_dataset.inter_feat[train_dataset.uid_field].numpy()
    rows = np.arange(len(users))
    time_field = train_dataset.time_field
    times = train_dataset.inter_feat[time_field].numpy() if time_field in train_dataset.inter_feat else rows
    order = np.lexsort((rows, times, users))
    sorted_users = users[order]
    is_last = np.append(sorted_users[1:] != sorted_users[:-1], True)
    return sorted_users[is_last], order[is_last]


def sequence_representations(model, samples: Callable, rows: np.ndarray, batch_size: int,
                             show_progress: bool = False) -> torch.Tensor:
    """``[len(rows), d]`` frozen-SASRec representations of the samples at ``rows`` (batched, on CPU).

    ``samples(rows)`` returns those samples as an ``Interaction``: :func:`collate_rows` of a training
    loader (the samples exactly as training assembled them), or a dataset's ``__getitem__``.
    """
    chunks = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    outputs = []
    for chunk in tqdm(chunks, desc="Representations", ncols=100, disable=not show_progress):
        outputs.append(model.sequence_representation(samples(chunk).to(model.device)).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


def collate_rows(loader, rows: np.ndarray):
    """The samples at ``rows`` of ``loader``'s dataset, as the loader assembles them (transform, sampling)."""
    batch = loader.collate_fn(rows)
    return batch[0] if isinstance(batch, tuple) else batch


def cluster_users(users: np.ndarray, representations: torch.Tensor, num_clusters: int, seed: int) -> UserClusters:
    """KMeans with ``num_clusters`` clusters and ``random_state=seed``: the same labels for the same seed."""
    if not 2 <= num_clusters <= len(users):
        raise ValueError(
            f"clusters must be between 2 and the number of training users ({len(users)}); got {num_clusters}."
        )
    kmeans = KMeans(n_clusters=num_clusters, random_state=seed, n_init=KMEANS_N_INIT)
    labels = kmeans.fit_predict(representations.double().numpy())
    return UserClusters(users=users, labels=labels.astype(np.int64), kmeans=kmeans)


def rows_by_cluster(train_dataset, clusters: UserClusters) -> list[np.ndarray]:
    """Every training row of each cluster's users."""
    row_cluster = clusters.lookup(train_dataset.inter_feat[train_dataset.uid_field].numpy())
    return [np.flatnonzero(row_cluster == cluster) for cluster in range(clusters.num_clusters)]


def sample_rows(rows: np.ndarray, size: int, seed: int, cluster: int) -> np.ndarray:
    """A fixed random sample (without replacement) of ``size`` rows, seeded by (seed, cluster); all if fewer."""
    if len(rows) <= size:
        return rows
    generator = np.random.default_rng([seed, cluster])
    return np.sort(generator.choice(rows, size=size, replace=False))
