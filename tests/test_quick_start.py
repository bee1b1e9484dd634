"""Foundation: the CLI, RecBole baselines through run_recbole_ilora, and the uni19 protocol."""

from __future__ import annotations

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_ilora.cli import OverrideError, build_parser, parse_overrides
from recbole_ilora.config import Config
from recbole_ilora.quick_start import run_recbole_ilora


def test_cli_parses_recbole_overrides():
    args, extra = build_parser().parse_known_args(
        ["--model=GRU4Rec", "--dataset=ml-100k", "--epochs=3", "--learning_rate=1e-3", "--topk=[1,5]",
         "--eval_args={'mode': 'full'}", "--show_progress=false", "--gpu_id=0"]
    )
    assert (args.model, args.dataset) == ("GRU4Rec", "ml-100k")
    overrides = parse_overrides(extra)
    assert overrides["epochs"] == 3 and overrides["learning_rate"] == 1e-3
    assert overrides["topk"] == [1, 5] and overrides["eval_args"] == {"mode": "full"}
    assert overrides["show_progress"] is False


@pytest.mark.parametrize("bad", [["--epochs", "3"], ["epochs=3"], ["--epochs=3", "--epochs=4"]])
def test_cli_rejects_malformed_overrides(bad):
    with pytest.raises(OverrideError):
        parse_overrides(bad)


def test_protocol_defaults_and_precedence():
    config = Config(model="SASRec", dataset="ml-100k", config_dict={"topk": [1, 5]})
    assert config["eval_args"]["mode"] == {"valid": "uni19", "test": "uni19"}
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"} and config["eval_args"]["order"] == "TO"
    assert config["valid_metric"] == "NDCG@5" and config["topk"] == [1, 5]
    assert config["item_text_field"] == "movie_title"  # from properties/dataset/ml-100k.yaml
    llara = Config(model="LLaRA", dataset="ml-100k", config_dict={"llm_path": "tiny-random-llama"})
    assert llara["lora_rank"] == 8 and llara["gate_lr_factor"] == 0.3  # inherited from iLoRA.yaml


def test_uni19_evaluation_has_20_candidates_per_user(ml100k_slice):
    config = Config(model="SASRec", dataset="ml-100k-slice", config_dict=ml100k_slice)
    _, _, test = data_preparation(config, create_dataset(config))
    interaction, row_idx, positive_u, positive_i = next(iter(test))
    rows_per_user = torch.bincount(row_idx)
    assert torch.all(rows_per_user == 20)
    assert len(positive_i) == len(rows_per_user)  # one target per user among the 20


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec"])
def test_baselines_train_and_test(model, ml100k_slice, run_dirs):
    result = run_recbole_ilora(model, "ml-100k-slice", config_dict={**ml100k_slice, **run_dirs, "epochs": 1})
    test = result["test_result"]
    for key in ("hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10"):
        assert 0.0 <= test[key] <= 1.0
    assert test["hit@1"] <= test["hit@5"] <= test["hit@10"]
    assert result["test_per_user"]["hit@10"].mean() == pytest.approx(test["hit@10"], abs=1e-4)
    assert result["num_trainable_parameters"] > 0 and result["train_time_s"] > 0


def test_full_ranking_mode(ml100k_slice, run_dirs):
    overrides = {**ml100k_slice, **run_dirs, "epochs": 1, "eval_args": {
        "split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}}
    result = run_recbole_ilora("GRU4Rec", "ml-100k-slice", config_dict=overrides)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
