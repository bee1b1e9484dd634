"""Fixed evaluation candidates (``fixed_eval_negatives``, on by default): the uni19 negatives of a user are
the same at every evaluation and for every model, so repeated evaluations agree and the models of a grid
are ranked against the same candidates. Off, RecBole redraws them from the global stream."""

from __future__ import annotations

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_ilora.config import Config
from recbole_ilora.evaluation import prepare_eval_loaders
from recbole_ilora.evaluation.negatives import PerUserSeededNegatives
from recbole_ilora.pipeline import build_model
from recbole_ilora.trainer import get_trainer
from tests.helpers import TINY_LLM, randomize_lora_b


def build(model_name, overrides, **changes):
    """Config, loaders (with ``prepare_eval_loaders`` as the quick start applies it), model and trainer."""
    config = Config(model=model_name, dataset="ml-100k-slice", config_dict={**overrides, **changes})
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    prepare_eval_loaders(config, valid, test)
    init_seed(config["seed"], True)
    model = build_model(config, train._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    return trainer, train, valid, test


def evaluate_recording(trainer, test) -> dict:
    """Evaluate on ``test``; return the metrics, every score and each user's candidate items."""
    model, scores, candidates = trainer.model, [], {}
    predict = model.predict

    def recording_predict(interaction):
        out = predict(interaction)
        scores.append(out.detach().clone())
        users, items = interaction[model.USER_ID].tolist(), interaction[model.ITEM_ID].tolist()
        for user, item in zip(users, items):
            candidates.setdefault(user, []).append(item)
        return out

    model.predict = recording_predict
    try:
        result = trainer.evaluate(test, load_best_model=False)
    finally:
        del model.predict
    assert all(len(items) == 20 for items in candidates.values())  # target + 19 negatives (repeats possible)
    candidates = {user: sorted(items) for user, items in candidates.items()}
    return {"result": dict(result), "scores": torch.cat(scores), "candidates": candidates}


@pytest.fixture(scope="module")
def overrides(ml100k_slice, tmp_path_factory):
    return {**ml100k_slice, **TINY_LLM, "epochs": 1, "limit_train_batches": 2,
            "checkpoint_dir": str(tmp_path_factory.mktemp("saved"))}


@pytest.mark.parametrize("fixed", ["default", False])
def test_the_same_model_evaluated_twice(overrides, fixed):
    trainer, _, _, test = build("iLoRA", overrides, **({} if fixed == "default" else {"fixed_eval_negatives": fixed}))
    randomize_lora_b(trainer.model)
    first, second = evaluate_recording(trainer, test), evaluate_recording(trainer, test)
    if fixed:  # the default: bit-identical candidates, scores and metrics
        assert first["candidates"] == second["candidates"]
        assert torch.equal(first["scores"], second["scores"])
        assert first["result"] == second["result"]
    else:  # RecBole's global stream: the second evaluation draws other negatives
        assert first["candidates"] != second["candidates"]


def test_every_model_ranks_the_same_candidates(overrides):
    # Trained for different numbers of epochs (as early stopping does): without fixed negatives the
    # validations would leave the global stream at different places before the test.
    seen = {}
    for model_name, epochs in (("SASRec", 1), ("GRU4Rec", 2), ("iLoRA", 1)):
        trainer, train, valid, test = build(model_name, overrides, epochs=epochs)
        trainer.fit(train, valid, saved=False)
        seen[model_name] = evaluate_recording(trainer, test)["candidates"]
    assert len(seen["SASRec"]) == 40
    assert seen["SASRec"] == seen["GRU4Rec"] == seen["iLoRA"]


def test_a_sampling_call_holding_several_users_is_refused_not_drawn_from_the_global_stream(ml100k_slice, tmp_path):
    """Fixed candidates are a function of (seed, phase, user): rows of two users in one call cannot be."""
    _, _, _, test = build("SASRec", {**ml100k_slice, "epochs": 1, "checkpoint_dir": str(tmp_path)})
    sampling = test._neg_sampling
    assert isinstance(sampling, PerUserSeededNegatives)
    dataset = test._dataset
    users = dataset.inter_feat[dataset.uid_field]
    one_user = dataset.inter_feat[torch.nonzero(users == users[0]).view(-1)[:1]]
    two_users = dataset.inter_feat[torch.tensor([0, int(torch.nonzero(users != users[0])[0])])]
    assert torch.equal(sampling(one_user)[dataset.iid_field], sampling(one_user)[dataset.iid_field])  # seeded per user
    with pytest.raises(RuntimeError, match="rows of 2 users"):
        sampling(two_users)
