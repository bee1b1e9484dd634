"""The gradient-conflict / gate analysis on tiny LLaRA and iLoRA checkpoints (CPU, deterministic)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recbole_ilora.analysis import analyze
from recbole_ilora.analysis.cluster_metrics import evaluated_users
from recbole_ilora.analysis.clustering import cluster_users, collate_rows, last_training_rows, sequence_representations
from recbole_ilora.analysis.command import main
from recbole_ilora.analysis.gate import gate_statistics, gate_weights, normalised_entropy
from recbole_ilora.analysis.gradients import cluster_gradients, cosine_similarity, gram_matrices
from recbole_ilora.analysis.loading import build_data, build_model, check_same_data, load_run
from recbole_ilora.quick_start import run_recbole_ilora
from tests.helpers import TINY_LLM

CLUSTERS, SAMPLES = 4, 8


@pytest.fixture(scope="module")
def checkpoints(ml100k_slice, tmp_path_factory) -> dict[str, Path]:
    """A tiny LLaRA and a tiny iLoRA, trained for 2 batches; they share the cached gate encoder."""
    folder = tmp_path_factory.mktemp("saved")
    overrides = {**ml100k_slice, **TINY_LLM, "epochs": 1, "limit_train_batches": 2, "checkpoint_dir": str(folder)}
    paths = {}
    for model in ("LLaRA", "iLoRA"):
        run_recbole_ilora(model, "ml-100k-slice", config_dict=overrides)
        (paths[model],) = folder.glob(f"{model}-*.pth")
    return paths


@pytest.fixture(scope="module")
def analysis(checkpoints, tmp_path_factory) -> tuple[dict, Path]:
    """Both checkpoints through the command line, LLaRA first."""
    out = tmp_path_factory.mktemp("analysis")
    summary = main([f"--checkpoint={checkpoints['LLaRA']}", f"--checkpoint={checkpoints['iLoRA']}",
                    f"--clusters={CLUSTERS}", f"--samples_per_cluster={SAMPLES}", f"--out={out}", "--no_progress",
                    "--show_progress=False"])
    return summary, out


@pytest.fixture(scope="module")
def ilora(checkpoints):
    """The iLoRA checkpoint rebuilt, with its loaders and its users' representations."""
    run = load_run(checkpoints["iLoRA"])
    dataset, train_data, _, _ = build_data(run.config)
    model = build_model(run, train_data)
    users, rows = last_training_rows(train_data._dataset)
    representations = sequence_representations(model, partial(collate_rows, train_data), rows, batch_size=16)
    return model, users, representations, dataset, train_data


def test_outputs_exist_with_the_right_shapes(analysis):
    summary, out = analysis
    assert set(summary["gradient_similarity"]["LLaRA"]) == {"mixed"}
    assert set(summary["gradient_similarity"]["iLoRA"]) == {"mixed", "expert_0", "expert_1", "expert_2", "expert_3"}
    for label, parts in summary["gradient_similarity"].items():
        for part, item in parts.items():
            matrix = np.asarray(item["matrix"])
            assert matrix.shape == (CLUSTERS, CLUSTERS)
            csv = pd.read_csv(out / f"gradient_similarity_{label}_{part}.csv", index_col=0).to_numpy()
            np.testing.assert_allclose(csv, matrix, rtol=1e-5)
    assert np.asarray(summary["gate"]["iLoRA"]["cluster_mean"]).shape == (CLUSTERS, 4)
    assert summary["samples_used"] == [SAMPLES] * CLUSTERS and sum(summary["clustering"]["sizes"]) == 40
    for name in ("gradient_similarity.png", "gate_weights.png", "gate_weights.csv", "gate_weights.md",
                 "cluster_metrics.csv", "cluster_metrics.md", "clusters.csv", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "gradient_similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["gate"]["iLoRA"]["verdict"] in (out / "summary.md").read_text()
    # the two models read the same cached SASRec, so they agree on the users' representations
    assert all(check["same"] for check in summary["clustering"]["representation_check"].values())


def test_similarity_matrices_are_symmetric_with_unit_diagonal(analysis):
    for parts in analysis[0]["gradient_similarity"].values():
        for item in parts.values():
            matrix = np.asarray(item["matrix"], dtype=float)
            np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
            np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
            assert np.all(np.abs(matrix) <= 1 + 1e-9)
            assert not np.allclose(matrix, 1.0)  # clusters' gradients differ


def test_per_cluster_metrics_weighted_by_cluster_size_give_the_overall_metric(analysis):
    for metrics in analysis[0]["test_metrics"].values():
        users = np.asarray(metrics["users"])
        assert users.sum() == 40
        for name in ("hit@1", "ndcg@5"):
            per_cluster = np.asarray([v if v is not None else 0.0 for v in metrics["clusters"][name]])
            weighted = float((per_cluster * users).sum() / users.sum())
            assert weighted == pytest.approx(metrics["overall"][name], abs=1e-12)
            assert weighted == pytest.approx(metrics["recbole_result"][name], abs=1e-4)  # RecBole rounds to 4 places
    table = pd.read_csv(analysis[1] / "cluster_metrics.csv")
    assert list(table["cluster"]) == [f"C{c}" for c in range(CLUSTERS)] + ["all"]
    np.testing.assert_allclose(table["iLoRA - LLaRA ndcg@5"], table["iLoRA ndcg@5"] - table["LLaRA ndcg@5"], atol=1e-5)


def test_llara_alone_has_no_gate_and_reproduces_its_gradients(analysis, checkpoints, tmp_path):
    summary = analyze([checkpoints["LLaRA"]], tmp_path, num_clusters=CLUSTERS, samples_per_cluster=SAMPLES,
                      overrides={"show_progress": False})
    assert summary["gate"] == {}
    assert not (tmp_path / "gate_weights.png").exists() and not (tmp_path / "gate_weights.csv").exists()
    assert "No model with more than one expert" in (tmp_path / "summary.md").read_text()
    # same seed, same clusters (LLaRA clusters in both runs), same prompts: the same matrix to the last bit
    assert summary["gradient_similarity"]["LLaRA"] == analysis[0]["gradient_similarity"]["LLaRA"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "clusters.csv"), pd.read_csv(analysis[1] / "clusters.csv"))


def test_clustering_is_deterministic_for_a_seed_and_changes_with_seed_or_k(ilora, analysis):
    _, users, representations, dataset, _ = ilora
    first = cluster_users(users, representations, CLUSTERS, seed=2020).labels
    assert np.array_equal(first, cluster_users(users, representations, CLUSTERS, seed=2020).labels)
    assert not np.array_equal(first, cluster_users(users, representations, CLUSTERS, seed=7).labels)
    assert not np.array_equal(first, cluster_users(users, representations, 3, seed=2020).labels)
    # the analysis clustered with LLaRA's copy of the same SASRec: the same labels, user by user
    saved = pd.read_csv(analysis[1] / "clusters.csv", dtype={"user_id": str}).set_index("user_id")["cluster"]
    assert saved.loc[dataset.id2token(dataset.uid_field, users)].tolist() == first.tolist()
    with pytest.raises(ValueError, match="clusters must be between 2"):
        cluster_users(users, representations, len(users) + 1, seed=2020)


def test_gate_forced_to_one_expert_is_reported_collapsed(ilora):
    model, users, representations, _, _ = ilora
    labels = cluster_users(users, representations, CLUSTERS, seed=2020).labels
    healthy = gate_statistics(gate_weights(model, representations, 16), labels, CLUSTERS)
    assert not healthy["collapsed"] and healthy["mean_user_entropy"] > 0.1
    gates = model.adapter.expert_gate
    adapter, original = next(iter(gates.items()))
    forced = torch.nn.Linear(original.in_features, model.num_experts)  # expert 2's logit dominates everywhere
    torch.nn.init.zeros_(forced.weight)
    forced.bias.data = torch.tensor([0.0, 0.0, 40.0, 0.0])
    gates[adapter] = forced
    try:
        stats = gate_statistics(gate_weights(model, representations, 16), labels, CLUSTERS)
    finally:
        gates[adapter] = original
    assert stats["mean_user_entropy"] == pytest.approx(0.0, abs=1e-12) and stats["collapsed"]
    assert stats["top_expert_share"] == [0.0, 0.0, 1.0, 0.0] and stats["verdict"].startswith("COLLAPSED")
    assert "expert 2" in stats["verdict"]
    np.testing.assert_allclose(np.asarray(stats["cluster_mean"])[:, 2], 1.0)


def test_cluster_gradients_ignore_global_rng_dropout_and_curriculum_state(ilora):
    model, _, _, _, train_data = ilora
    rows = [np.arange(0, 6), np.arange(6, 12)]
    model.train()  # LoRA dropout would be on
    model.training_progress = 0.0  # the curriculum would drop the behavioural tokens
    torch.manual_seed(0)
    first = cluster_gradients(model, train_data, rows, seed=2020, batch_size=4)
    assert model.training and model.training_progress == 0.0  # restored
    model.eval()
    model.training_progress = 1.0
    torch.manual_seed(1)
    second = cluster_gradients(model, train_data, rows, seed=2020, batch_size=4)
    for cluster_first, cluster_second in zip(first, second):
        assert all(torch.equal(a, b) for a, b in zip(cluster_first, cluster_second))
    assert not torch.equal(first[0][1], first[1][1])  # the clusters' gradients differ


def test_gate_entropies_on_crafted_weights():
    labels = np.array([0, 0, 1, 1])
    one_hot_different = torch.eye(4)[[0, 1, 2, 3]]  # each user on one expert, but not the same one
    stats = gate_statistics(one_hot_different, labels, 2)
    assert stats["mean_user_entropy"] == 0.0 and stats["mixture_entropy"] == pytest.approx(1.0)
    assert not stats["collapsed"]
    uniform = gate_statistics(torch.full((4, 4), 0.25), labels, 2)
    assert uniform["mean_user_entropy"] == pytest.approx(1.0) and uniform["cluster_spread"] == 0.0
    assert normalised_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])).item() == pytest.approx(0.5)
    assert stats["cluster_mean"] == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    assert stats["cluster_std"][0] == [0.5, 0.5, 0.0, 0.0]


def test_expert_parts_are_rows_of_a_and_columns_of_b():
    """rank 4, 2 experts: expert 0 = rows 0-1 of A and columns 0-1 of B; crafted so it agrees, expert 1 opposes."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=generator), torch.randn(5, 4, generator=generator)
    flip_expert_1 = torch.tensor([1.0, 1.0, -1.0, -1.0])
    gradients = [[a, b], [a * flip_expert_1[:, None], b * flip_expert_1]]
    names = ["layer.lora_A.default.weight", "layer.lora_B.default.weight"]
    grams = gram_matrices(names, gradients, rank=4, num_experts=2)
    assert cosine_similarity(grams["expert_0"])[0, 1] == pytest.approx(1.0)
    assert cosine_similarity(grams["expert_1"])[0, 1] == pytest.approx(-1.0)
    torch.testing.assert_close(grams["mixed"], grams["expert_0"] + grams["expert_1"])
    expected_mixed = (a * gradients[1][0]).sum() + (b * gradients[1][1]).sum()
    assert grams["mixed"][0, 1].item() == pytest.approx(expected_mixed.item())
    with pytest.raises(ValueError, match="lora_rank is 8"):
        gram_matrices(names, gradients, rank=8, num_experts=2)


@pytest.mark.parametrize("mode", ["uni19", "full"])
def test_evaluated_users_follow_the_order_of_the_evaluation_batches(checkpoints, mode):
    """The per-user vectors are credited to the users RecBole's evaluation visits, in its order."""
    run = load_run(checkpoints["LLaRA"], {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                                                        "group_by": "user", "mode": mode}})
    _, _, _, test_data = build_data(run.config)
    visited = []
    for interaction, row_idx, positive_u, _ in test_data:
        group = row_idx if row_idx is not None else positive_u  # full ranking: one row per user
        users = torch.zeros(int(group.max()) + 1, dtype=torch.long)
        users[group] = interaction["user_id"]
        visited.append(users)
    assert torch.cat(visited).tolist() == evaluated_users(test_data).tolist()


def test_checkpoints_of_different_data_are_refused(checkpoints):
    llara = load_run(checkpoints["LLaRA"])
    other = load_run(checkpoints["iLoRA"], {"MAX_ITEM_LIST_LENGTH": 5})
    check_same_data(llara, load_run(checkpoints["iLoRA"]))
    with pytest.raises(ValueError, match="different data.*MAX_ITEM_LIST_LENGTH"):
        check_same_data(llara, other)
