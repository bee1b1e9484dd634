"""Asking a trained model: save/load round trips (a fresh process scores identically), top-k for a user or a
history over the catalogue or given candidates, RecBole's own scores for its models, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recbole_ilora.quick_start import run_recbole_ilora
from recbole_ilora.recommend import Recommender, RecommendError, save_pretrained

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):
    """An iLoRA and a SASRec trained briefly on the slice; their best-model checkpoints."""
    folder = tmp_path_factory.mktemp("trained")
    overrides = {**tiny_setup[0], "limit_train_batches": 3, "checkpoint_dir": str(folder)}
    run_recbole_ilora("iLoRA", "ml-100k-slice", config_dict=overrides)
    run_recbole_ilora("SASRec", "ml-100k-slice", config_dict={**overrides, "epochs": 2})
    checkpoints = {path.name.split("-")[0]: path for path in folder.glob("*.pth")}
    return checkpoints["iLoRA"], checkpoints["SASRec"], overrides


def score_candidates_in_a_fresh_process(path: Path, user: str, candidates: list[str]) -> list[float]:
    code = (
        "import json, sys, recbole_ilora\n"
        "from recbole_ilora.recommend import Recommender\n"
        f"table = Recommender.load({str(path)!r}, device='cpu').recommend(user={user!r}, candidates={candidates!r}, "
        f"k={len(candidates)})\n"
        "print(json.dumps(dict(zip(table.item_id, table.score))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_llm_recommender_saved_and_loaded_in_a_fresh_process_scores_identically(trained, tmp_path):
    checkpoint, _, _ = trained
    recommender = Recommender.load(checkpoint, device="cpu")
    candidates = ["50", "100", "181", "258", "286"]
    table = recommender.recommend(user="1", candidates=candidates, k=5)
    here = dict(zip(table.item_id, table.score))
    assert set(here) == set(candidates) and list(table.score) == sorted(table.score, reverse=True)
    save_pretrained(recommender.model, recommender.config, tmp_path / "ilora")
    written = {path.name for path in (tmp_path / "ilora").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "gate_encoder.pth", "recbole_settings.json"} <= written
    assert json.loads((tmp_path / "ilora" / "adapter_config.json").read_text())["peft_type"] == "EXPERT_LORA"
    for path in (checkpoint, tmp_path / "ilora"):
        assert score_candidates_in_a_fresh_process(path, "1", candidates) == here


def test_top_k_over_the_catalogue_leaves_the_history_out_and_names_titles(trained):
    checkpoint, _, _ = trained
    recommender = Recommender.load(checkpoint, device="cpu")
    table = recommender.recommend(user="1", k=7)
    history = set(recommender.dataset.id2token(recommender.dataset.iid_field, recommender.history_of("1").numpy()))
    assert len(table) == 7 and list(table["rank"]) == list(range(1, 8))
    assert not set(table.item_id) & history
    assert list(table.score) == sorted(table.score, reverse=True)
    assert all(isinstance(title, str) and title for title in table.title)
    from_history = recommender.recommend(history=["50", "181"], k=3, include_history=True)
    assert len(from_history) == 3


def test_a_recbole_model_recommends_what_recboles_full_sort_scores_rank(trained):
    """SASRec's scores for a user's history before their test item are RecBole's full_sort_scores for that user."""
    from recbole.data import data_preparation
    from recbole.utils.case_study import full_sort_scores

    _, checkpoint, _ = trained
    recommender = Recommender.load(checkpoint, device="cpu")
    dataset = recommender.dataset
    _, _, test = data_preparation(recommender.config, dataset)
    user = "3"
    history = dataset.id2token(dataset.iid_field, recommender.history_of(user)[:-1].numpy()).tolist()
    table = recommender.recommend(history=history, k=dataset.item_num, include_history=True)
    ours = dict(zip(table.item_id, table.score))
    uid = dataset.token2id(dataset.uid_field, [user])
    expected = full_sort_scores(uid, recommender.model, test, device="cpu")[0]
    finite = torch.nonzero(torch.isfinite(expected)).view(-1)  # RecBole leaves out the user's training items
    assert len(finite) > 10
    items = dataset.id2token(dataset.iid_field, finite.numpy()).tolist()
    torch.testing.assert_close(torch.tensor([ours[item] for item in items]), expected[finite].float())


def test_the_command_line_prints_the_top_k_or_one_line_errors(trained):
    checkpoint, _, _ = trained
    command = [sys.executable, "-m", "recbole_ilora.recommend", str(checkpoint), "--device=cpu"]
    done = subprocess.run(command + ["--user=1", "--k=3"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["rank", "item_id", "title", "score"] and len(lines) == 4
    unknown = subprocess.run(command + ["--user=no-such-user"], capture_output=True, text=True, cwd=REPO)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines()[-1].startswith("python -m recbole_ilora.recommend: error: Unknown user")


def test_what_cannot_be_asked_is_refused_clearly(trained, tmp_path):
    checkpoint, _, _ = trained
    with pytest.raises(RecommendError, match="No checkpoint"):
        Recommender.load(tmp_path / "missing.pth")
    torch.save({"kind": "resume"}, tmp_path / "other.pth")
    with pytest.raises(RecommendError, match="not a model checkpoint"):
        Recommender.load(tmp_path / "other.pth")
    recommender = Recommender.load(checkpoint, device="cpu")
    with pytest.raises(RecommendError, match="either a user or a history"):
        recommender.recommend()
    with pytest.raises(RecommendError, match="Unknown candidate item 999999"):
        recommender.recommend(user="1", candidates=["50", "999999"])
