"""``score_fusion``: log_softmax(LLM) + lambda x log_softmax(SASRec) over each user's candidates, lambda chosen on
validation with the LLM's scores replayed; the plain results of a run stay exactly those of the LLM alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_ilora.evaluation import RecordingEvaluator, per_user_metrics, prepare_eval_loaders
from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.score_fusion import (LLMScoreReplay, best_weight, choose_fusion_weight, fuse_scores, scoring_with)
from recbole_ilora.trainer import iLoRATrainer
from tests.helpers import SLICE_NAME, first_batch, make_tiny_model, randomize_lora_b


@pytest.fixture(scope="module")
def fusion_setup(tiny_setup):
    """A tiny iLoRA (LoRA B randomised, so the adapter matters), a trainer that evaluates it as the quick start does,
    and valid / test loaders with the quick start's fixed candidates (RecBole's own redraw them on every pass)."""
    model, config = make_tiny_model(tiny_setup)
    randomize_lora_b(model)
    trainer = iLoRATrainer(config, model)
    trainer.evaluator = RecordingEvaluator(config)
    _, valid, test = data_preparation(config, create_dataset(config))
    prepare_eval_loaders(config, valid, test)
    return model, trainer, valid, test


def evaluate(trainer, data, weight=None, replay=None):
    with scoring_with(trainer.model, weight, replay):
        return dict(trainer.evaluate(data, load_best_model=False))


def fail_if_called(*args, **kwargs):
    raise AssertionError("the LLM scored candidates on a replayed pass")


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    total = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - total for v in values]


# ------------------------------------------------------------------------------------------------ formula
def test_fused_scores_are_the_formula_on_crafted_scores():
    llm = torch.tensor([[-3.0, -1.0, -2.0, -7.0], [-10.0, -20.0, -5.0, 0.0]])
    sasrec = torch.tensor([[0.5, 2.0, -1.0, 9.0], [1.0, 3.0, 0.0, 4.0]])
    present = torch.tensor([[True, True, True, False], [True, True, True, True]])
    fused = fuse_scores(llm, sasrec, 0.75, present)
    for row in range(2):
        slots = [slot for slot in range(4) if present[row, slot]]
        expected = [a + 0.75 * b for a, b in zip(log_softmax([llm[row, s].item() for s in slots]),
                                                log_softmax([sasrec[row, s].item() for s in slots]))]
        torch.testing.assert_close(fused[row, slots], torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert fused[0, 3] == float("-inf")  # no candidate there: never ranked, whatever SASRec thinks of it
    torch.testing.assert_close(fuse_scores(llm, sasrec, 0.0, present)[1], torch.log_softmax(llm[1], 0))
    # SASRec alone decides where the LLM is indifferent
    flat = fuse_scores(torch.zeros(1, 3), torch.tensor([[1.0, 3.0, 2.0]]), 1.0)
    assert flat.argsort(descending=True).tolist() == [[1, 2, 0]]


def test_the_model_fuses_its_llm_scores_with_recboles_sasrec_scores(fusion_setup):
    model, _, valid, _ = fusion_setup
    interaction = first_batch(valid)
    model.eval()
    with torch.no_grad():
        llm = model.predict(interaction)
        with scoring_with(model, 0.6):
            fused = model.predict(interaction)
        # RecBole's own SASRec.predict, row by row (the frozen gate encoder is one)
        sasrec = model.gate_encoder.predict(interaction)
    users = interaction["user_id"]
    starts = [0] + [row for row in range(1, len(users)) if users[row] != users[row - 1]] + [len(users)]
    assert len(starts) > 3
    for start, end in zip(starts[:-1], starts[1:]):
        expected = [a + 0.6 * b for a, b in zip(log_softmax(llm[start:end].tolist()), log_softmax(sasrec[start:end].tolist()))]
        torch.testing.assert_close(fused[start:end], torch.tensor(expected), atol=1e-5, rtol=1e-6)
    assert not torch.equal(fused.argsort(), llm.argsort())  # SASRec's part changes some ranking

    two_users = interaction[torch.tensor([0, starts[1]])]
    with torch.no_grad():
        full_llm = model.full_sort_predict(two_users)
        with scoring_with(model, 2.0):
            full_fused = model.full_sort_predict(two_users)
        full_sasrec = model.gate_encoder.full_sort_predict(two_users)
    expected = torch.log_softmax(full_llm[:, 1:], 1) + 2.0 * torch.log_softmax(full_sasrec[:, 1:], 1)
    torch.testing.assert_close(full_fused[:, 1:], expected, atol=1e-5, rtol=1e-6)
    assert (full_fused[:, 0] == float("-inf")).all()


def test_off_the_model_scores_with_the_llm_alone(fusion_setup, monkeypatch):
    model, *_ = fusion_setup
    assert model.score_fusion_weight is None and model.llm_score_replay is None
    monkeypatch.setattr(model, "sasrec_scores", fail_if_called)
    model.eval()
    with torch.no_grad():
        model.predict(first_batch(fusion_setup[2]))


# ----------------------------------------------------------------------------------- through evaluation
def test_fusion_at_weight_zero_ranks_like_the_llm_alone(fusion_setup):
    _, trainer, valid, _ = fusion_setup
    plain = evaluate(trainer, valid)
    plain_per_user = per_user_metrics(trainer.config, trainer.evaluator.last_struct)
    assert evaluate(trainer, valid, 0.0) == plain
    for metric, values in per_user_metrics(trainer.config, trainer.evaluator.last_struct).items():
        assert (values == plain_per_user[metric]).all(), metric


def test_replayed_llm_scores_give_exactly_the_metrics_of_recomputing_them(fusion_setup, monkeypatch):
    model, trainer, valid, test = fusion_setup
    recomputed = {weight: evaluate(trainer, valid, weight) for weight in (0.5, 4.0)}
    replay = LLMScoreReplay()
    evaluate(trainer, valid, 0.5, replay)  # records
    assert replay.recorded
    with monkeypatch.context() as patched:
        patched.setattr(model, "scorer", fail_if_called)
        for weight in (4.0, 0.5):
            replay.rewind()
            assert evaluate(trainer, valid, weight, replay) == recomputed[weight]
    assert recomputed[0.5] != recomputed[4.0]  # the weight matters: the replay is not replaying one result
    replay.rewind()
    with pytest.raises(RuntimeError, match="LLM score replay"):
        evaluate(trainer, test, 0.5, replay)  # other candidates than the recorded ones


def test_the_chosen_weight_is_the_best_on_validation(fusion_setup):
    assert best_weight({0.0: 0.30, 0.5: 0.40, 1.0: 0.40, 2.0: 0.10}, bigger=True) == 0.5  # ties: the smaller
    assert best_weight({0.0: 0.30, 0.5: 0.40, 1.0: 0.40, 2.0: 0.10}, bigger=False) == 2.0
    assert best_weight({4.0: 0.2, 0.0: 0.2}, bigger=True) == 0.0

    _, trainer, valid, _ = fusion_setup
    weights = [4.0, 0.0, 1.0, 0.25]
    chosen, valid_by_weight, chosen_result = choose_fusion_weight(trainer, valid, weights)
    metric = trainer.config["valid_metric"].lower()
    assert list(valid_by_weight) == sorted(weights)
    for weight in weights:  # each value is that of a plain evaluation at the weight
        assert valid_by_weight[weight] == evaluate(trainer, valid, weight)[metric]
    assert valid_by_weight[chosen] == max(valid_by_weight.values())
    assert chosen == min(w for w, v in valid_by_weight.items() if v == valid_by_weight[chosen])
    assert dict(chosen_result) == evaluate(trainer, valid, chosen)
    assert trainer.model.score_fusion_weight is None and trainer.model.llm_score_replay is None


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("model_name", ["iLoRA", "TALLRec"])
def test_a_run_with_score_fusion_reports_it_apart_and_keeps_the_plain_results(tiny_setup, tmp_path, model_name):
    # TALLRec has no SASRec of its own: score_fusion loads one, which must change nothing else.
    overrides = {**tiny_setup[0], "limit_train_batches": 2, "score_fusion_weights": [0.0, 1.0, 8.0]}
    runs = {on: run_recbole_ilora(model_name, SLICE_NAME, config_dict={
        **overrides, "score_fusion": on, "checkpoint_dir": str(tmp_path / f"saved-{on}")}) for on in (False, True)}
    plain, fused = runs[False], runs[True]
    assert "score_fusion" not in plain
    for key in ("best_valid_result", "test_result", "best_valid_score", "num_trainable_parameters"):
        assert fused[key] == plain[key], key
    for metric, values in plain["test_per_user"].items():
        assert (fused["test_per_user"][metric] == values).all(), metric

    fusion = fused["score_fusion"]
    assert set(fusion) == {"weight", "valid_by_weight", "best_valid_result", "test_result", "test_per_user",
                           "eval_time_s"}
    assert list(fusion["valid_by_weight"]) == [0.0, 1.0, 8.0] and fusion["weight"] in fusion["valid_by_weight"]
    metric = tiny_setup[1]["valid_metric"].lower()
    assert fusion["valid_by_weight"][fusion["weight"]] == max(fusion["valid_by_weight"].values())
    assert fusion["best_valid_result"][metric] == fusion["valid_by_weight"][fusion["weight"]]
    assert fusion["valid_by_weight"][0.0] == plain["best_valid_result"][metric]  # weight 0: the LLM's ranking
    assert set(fusion["test_result"]) == set(plain["test_result"])
    assert {m: len(v) for m, v in fusion["test_per_user"].items()} == {m: len(v) for m, v in plain["test_per_user"].items()}
    for name, value in fusion["test_result"].items():  # the per-user vectors are those of the fused test
        assert fusion["test_per_user"][name].mean() == pytest.approx(value, abs=1e-4), name

    if model_name == "iLoRA":  # the plain run's checkpoint, evaluated with fusion: the same choice and results
        (checkpoint,) = Path(tmp_path / "saved-False").glob("iLoRA-*.pth")
        again = run_recbole_ilora(model_name, SLICE_NAME, config_dict={
            **overrides, "checkpoint_dir": str(tmp_path / "saved-False"), "eval_checkpoint": str(checkpoint),
            "score_fusion": True})
        assert again["test_result"] == plain["test_result"]
        assert {k: v for k, v in again["score_fusion"].items() if k not in ("eval_time_s", "test_per_user")} == \
            {k: v for k, v in fusion.items() if k not in ("eval_time_s", "test_per_user")}
