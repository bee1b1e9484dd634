"""Leaderboard: grid spec, equal tuning budgets, resumable results store, failures, significance tests,
the proposed/baseline roles and the exports.

The end-to-end test runs a real tiny grid (Pop, GRU4Rec, LLaRA, iLoRA x 2 seeds, one epoch each on the
ml-100k slice, the LLMs on ``tiny-random-llama``), interrupts it, resumes it and exports it. The other
tests use a fake runner with hand-built per-user vectors, so they take no training time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from recbole_ilora.cli import main as cli_main
from recbole_ilora.leaderboard import runner as runner_module
from recbole_ilora.leaderboard.exports import export_leaderboard, export_tables, to_json, to_markdown
from recbole_ilora.leaderboard.jobs import shard_argv
from recbole_ilora.leaderboard.plot import plot_leaderboard
from recbole_ilora.leaderboard.runner import run_grid, run_leaderboard
from recbole_ilora.leaderboard.significance import (
    POOL_CONCAT,
    POOL_MEAN,
    paired_test,
    pool_pairs,
    significance_marker,
)
from recbole_ilora.leaderboard.spec import GridSpec, GridSpecError, load_grid_spec
from recbole_ilora.leaderboard.store import ResultsStore, config_hash
from recbole_ilora.leaderboard.tables import (
    COST_COLUMNS,
    Leaderboard,
    build_leaderboard,
)
from recbole_ilora.quick_start import run_recbole_ilora
from tests.helpers import TINY_LLM

FAST = {"epochs": 1, "train_batch_size": 256, "eval_batch_size": 256}
# The plugin models on a tiny random Llama, a tiny gate encoder and two training batches: they only have to run.
TINY_LLM = {**TINY_LLM, "limit_train_batches": 2}


def parse_markdown_means(markdown: str) -> dict[tuple[str, str], float]:
    """The means shown in to_markdown's table: ``{(model, "ml-100k HR@1"): mean}`` (metric cells only)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    means = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for column, cell in zip(header[1:], cells[1:]):
            if column.endswith(tuple(COST_COLUMNS.values())):
                continue
            match = re.fullmatch(r"(?:\*\*|<u>)?(\d+\.\d+)(?: ± \d+\.\d+)?(?:\*\*|</u>)?(?: \(n=\d+\))?[†‡]?", cell)
            if match:
                means[(cells[0], column)] = float(match.group(1))
    return means


def numeric_means(board: Leaderboard) -> dict[tuple[str, str], float]:
    """``{(model, "dataset metric"): mean}`` from the numbers, in parse_markdown_means' layout."""
    return {(row.model, f"{row.dataset} {row.metric}"): float(row.mean) for row in board.summary.itertuples()}


class CountingRunner:
    """Calls the real (or a fake) runner and records which cells it was asked to run."""

    def __init__(self, runner=run_recbole_ilora, interrupt_at: int | None = None):
        self.runner = runner
        self.interrupt_at = interrupt_at
        self.calls: list[tuple] = []

    def __call__(self, **kwargs):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while this cell was running
        self.calls.append((kwargs["model"], kwargs["dataset"], kwargs["config_dict"]["seed"]))
        return self.runner(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Significance


def test_wilcoxon_matches_scipy_on_a_hand_built_case():
    x = np.array([1, 1, 1, 0, 1, 1, 0.5, 1, 1, 1, 0, 1, 0.3, 1, 1, 0, 0, 1], dtype=float)
    y = np.array([0, 0, 1, 0, 0, 1, 0.2, 0, 0, 0, 1, 0, 0.1, 0, 0, 0, 0, 0], dtype=float)
    expected = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    result = paired_test(x, y)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.statistic == pytest.approx(expected.statistic)
    assert (result.n_pairs, result.n_nonzero) == (18, 13)
    assert result.p_value < 0.05 and result.marker in {"†", "‡"}


def test_wilcoxon_known_answer_and_paired_ttest():
    # 12 users, all better by 1: the exact two-sided signed-rank p-value is 2 * 0.5**12.
    result = paired_test(np.ones(12), np.zeros(12))
    assert result.p_value == pytest.approx(2 * 0.5**12)
    assert result.marker == "‡"
    rng = np.random.default_rng(0)
    x, y = rng.random(50), rng.random(50)
    result = paired_test(x, y, method="ttest")
    expected = stats.ttest_rel(x, y)
    assert result.p_value == pytest.approx(expected.pvalue)
    assert result.statistic == pytest.approx(expected.statistic)


@pytest.mark.parametrize("method", ["wilcoxon", "ttest"])
def test_identical_vectors_are_not_significant(method):
    x = np.array([0.0, 1.0, 0.5, 1.0, 0.0])
    result = paired_test(x, x.copy(), method=method)
    assert result.p_value == 1.0
    assert result.marker == ""
    assert "zero" in result.note


def test_markers_and_bad_input():
    assert (significance_marker(0.004), significance_marker(0.04), significance_marker(0.2)) == ("‡", "†", "")
    assert significance_marker(float("nan")) == ""
    with pytest.raises(ValueError):
        paired_test([1.0, 0.0], [1.0])
    with pytest.raises(ValueError):
        paired_test([1.0], [0.0], method="sign")


def test_pooling_averages_users_over_seeds_or_concatenates():
    x = {1: [1.0, 0.0, 1.0], 2: [0.0, 0.0, 1.0]}
    y = {1: [0.0, 0.0, 0.0], 2: [1.0, 1.0, 0.0], 3: [9.0, 9.0, 9.0]}  # seed 3 has no partner: ignored
    px, py, pooling = pool_pairs(x, y)
    assert pooling == POOL_MEAN
    np.testing.assert_allclose(px, [0.5, 0.0, 1.0])
    np.testing.assert_allclose(py, [0.5, 0.5, 0.0])
    px, py, pooling = pool_pairs({1: [1.0], 2: [0.0, 1.0]}, {1: [0.0], 2: [1.0, 1.0]})
    assert pooling == POOL_CONCAT
    np.testing.assert_allclose(px, [1.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------------------------
# Grid spec


def test_grid_spec_merges_overrides_by_precedence_and_hashes_stably(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": ["Pop", "SASRec"],
                "datasets": ["ml-100k"],
                "seeds": [1, 2],
                "overrides": {"epochs": 5, "learning_rate": "1e-3", "show_progress": False},
                "dataset_overrides": {"ml-100k": {"epochs": 4, "train_batch_size": 64}},
                "model_overrides": {"SASRec": {"epochs": 3}},
                "cell_overrides": [{"model": "SASRec", "seed": 2, "overrides": {"hidden_size": 32}}],
            }
        )
    )
    path.write_text(path.read_text().replace("'1e-3'", "1e-3"))  # a bare 1e-3, as users write it
    spec = load_grid_spec(path)
    cells = {(c.model, c.seed): c for c in spec.cells({"train_batch_size": 128})}
    assert cells["Pop", 1].overrides == {"epochs": 4, "learning_rate": 1e-3, "show_progress": False, "train_batch_size": 128}
    assert cells["SASRec", 1].overrides["epochs"] == 3
    assert "hidden_size" not in cells["SASRec", 1].overrides
    assert cells["SASRec", 2].overrides["hidden_size"] == 32
    # Same settings -> same hash, whatever their order; printing settings do not count; others do.
    assert cells["Pop", 1].config_hash == cells["Pop", 2].config_hash
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) == config_hash({"a": 1, "show_progress": True, "state": "INFO", "gpu_id": "1"})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert cells["SASRec", 1].config_hash != cells["SASRec", 2].config_hash


def test_config_hash_keeps_the_hashes_of_existing_results_files(tmp_path):
    # Results files written before the store used the shared fingerprint helpers hold these hashes:
    # sha256 of the compact, key-sorted JSON of the settings and of [path, sha256 of the file's bytes].
    config_file = tmp_path / "extra.yaml"
    config_file.write_text("hidden_size: 32\n")
    overrides = {"learning_rate": 1e-3, "eval_args": {"mode": "uni19"}, "show_progress": False}
    payload = {"overrides": {"eval_args": {"mode": "uni19"}, "learning_rate": 1e-3},
               "config_files": [[str(config_file), hashlib.sha256(config_file.read_bytes()).hexdigest()]]}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert config_hash(overrides, [str(config_file)]) == hashlib.sha256(text.encode()).hexdigest()[:16]
    before = config_hash(overrides, [str(config_file)])
    config_file.write_text("hidden_size: 64\n")  # editing a config file re-runs its cells
    assert config_hash(overrides, [str(config_file)]) != before


def test_grid_spec_refuses_mistakes(tmp_path):
    with pytest.raises(GridSpecError, match="seed"):
        GridSpec(models=["Pop"], datasets=["d"], seeds=[1], overrides={"seed": 3})
    with pytest.raises(GridSpecError, match="seed"):
        GridSpec(models=["Pop"], datasets=["d"], seeds=[1]).cells({"seed": 3})
    with pytest.raises(GridSpecError, match="non-empty"):
        GridSpec(models=[], datasets=["d"], seeds=[1])
    with pytest.raises(GridSpecError, match="significance_test"):
        GridSpec(models=["Pop"], datasets=["d"], seeds=[1], significance_test="sign")
    with pytest.raises(GridSpecError, match="`proposed: iLoRA` is not one of the grid's models"):
        GridSpec(models=["Pop", "SASRec"], datasets=["d"], seeds=[1], proposed="iLoRA")
    with pytest.raises(GridSpecError, match="`baseline: LLaRA` is not one of"):
        GridSpec(models=["Pop", "SASRec"], datasets=["d"], seeds=[1], baseline="LLaRA")
    with pytest.raises(GridSpecError, match="both SASRec"):
        GridSpec(models=["Pop", "SASRec"], datasets=["d"], seeds=[1], baseline="SASRec")
    path = tmp_path / "grid.yaml"
    path.write_text("models: [Pop]\ndatasets: [d]\nseeds: [1]\nmodel_override: {}\n")
    with pytest.raises(GridSpecError, match="unknown keys"):
        load_grid_spec(path)


def test_default_grid_file_is_valid():
    spec = load_grid_spec("properties/leaderboard.yaml")
    assert spec.models == ["Pop", "GRU4Rec", "Caser", "SASRec", "BERT4Rec", "LLaRA", "TALLRec", "iLoRA"]
    assert spec.datasets == ["ml-100k"] and spec.seeds == [2020, 2021, 2022]
    assert (spec.proposed, spec.baseline) == ("iLoRA", "LLaRA")
    assert len(spec.cells()) == 24


def test_quality_grid_tunes_every_model_with_the_same_budget():
    spec = load_grid_spec("benchmarks/quality-gpu.yaml")
    assert spec.models == ["SASRec", "GRU4Rec", "Caser", "BERT4Rec", "TALLRec", "LLaRA", "iLoRA"]
    assert spec.datasets == ["ml-100k", "lastfm"]
    assert (spec.proposed, spec.baseline, spec.seeds) == ("iLoRA", "LLaRA", [2020, 2021, 2022])
    assert spec.tuned_models == spec.models and not spec.tune.allow_unequal_budgets
    assert {model: spec.tune.budget(model) for model in spec.models} == dict.fromkeys(spec.models, 4)
    # The best LLM learning rate of the earlier grid (1.6e-3) was its largest value: this grid reaches above it.
    for model in ("TALLRec", "LLaRA", "iLoRA"):
        assert max(trial["learning_rate"] for trial in spec.tune.trials(model)) > 1.6e-3
    # Every LLM cell gets the same budget: whole epochs, sizes given (cells sharing a GPU must not each probe it).
    llm_budgets = [{key: spec.cell_settings(model, "ml-100k", 2020)[key] for key in
                    ("epochs", "train_batch_size", "gradient_accumulation_steps", "eval_batch_size")}
                   for model in ("TALLRec", "LLaRA", "iLoRA")]
    assert llm_budgets[0] == llm_budgets[1] == llm_budgets[2] and "auto" not in llm_budgets[0].values()
    assert "limit_train_batches" not in spec.cell_settings("iLoRA", "lastfm", 2020)
    # A cell rerun alone from its record's command reproduces its metrics: GPU kernels chosen deterministic.
    assert all(spec.cell_settings(model, dataset, 2021)["deterministic_algorithms"] is True
               for model in ("TALLRec", "LLaRA", "iLoRA") for dataset in spec.datasets)
    assert len(spec.tuning_cells()) == 2 * 7 * 4  # datasets x models x trials (one tuning seed)
    # The authors' generation protocol on their LastFM split, for every LLM and nowhere else.
    generating = {(model, dataset) for model in spec.models for dataset in spec.datasets
                  if spec.cell_settings(model, dataset, 2022).get("eval_generate")}
    assert generating == {(model, "lastfm") for model in ("TALLRec", "LLaRA", "iLoRA")}


def test_curves_grid_runs_the_authors_five_epochs_to_the_end_with_curves():
    spec = load_grid_spec("benchmarks/curves-gpu.yaml")
    assert (spec.models, spec.datasets, spec.seeds) == (["LLaRA", "iLoRA"], ["ml-100k", "lastfm"], [2020])
    settings = [spec.cell_settings(model, dataset, 2020) for model in spec.models for dataset in spec.datasets]
    assert all(s["epochs"] == 5 and s["learning_curve"] is True and s["deterministic_algorithms"] is True
               for s in settings)
    assert all(s["stopping_step"] >= s["epochs"] for s in settings)  # early stopping never cuts a curve short
    assert settings[0] == settings[2]  # the same budget for LLaRA and iLoRA


def test_ablation_grid_changes_one_thing_per_row_at_the_same_budget():
    spec = load_grid_spec("benchmarks/ablation-gpu.yaml")
    assert spec.models[:2] == ["SASRec", "iLoRA"] and all(spec.base_model(row) == "iLoRA" for row in spec.models[1:])
    budget = ("epochs", "learning_rate", "effective_batch_size", "llm_path", "listwise_loss_weight", "distill_loss_weight",
              "user_token", "score_fusion", "learning_curve", "deterministic_algorithms")
    sizes = {"train_batch_size", "gradient_accumulation_steps", "eval_batch_size"}  # memory, not the method
    for dataset in spec.datasets:
        default = spec.cell_settings("iLoRA", dataset, 2020)
        assert default["score_fusion"] and default["learning_curve"] and default["deterministic_algorithms"]
        for row in spec.models[2:]:
            settings = spec.cell_settings(row, dataset, 2020)
            changed = {key for key in set(settings) | set(default) if settings.get(key) != default.get(key)} - sizes
            assert len(changed) == 1 and changed <= set(budget), (row, changed)


def test_proposed_defaults_to_the_last_model_and_baseline_to_none():
    spec = GridSpec(models=["Pop", "GRU4Rec", "SASRec"], datasets=["d"], seeds=[1])
    assert (spec.proposed, spec.baseline) == ("SASRec", None)


# ----------------------------------------------------------------------------------------------------
# Store, failures and exports with a fake runner (no training)


def fake_result(model: str, seed: int, n_users: int = 30) -> dict:
    """A run_recbole_ilora-like result whose per-user vectors are deterministic in (model, seed)."""
    quality = {"Pop": 0.2, "GRU4Rec": 0.3, "SASRec": 0.35, "LLaRA": 0.4, "iLoRA": 0.6}[model]
    rng = np.random.default_rng([seed, len(model)])
    per_user = OrderedDict()
    for k in (1, 5, 10):
        hits = (rng.random(n_users) < min(1.0, quality * (1 + k / 10))).astype(float)
        per_user[f"hit@{k}"] = hits
        per_user[f"ndcg@{k}"] = hits * rng.uniform(0.3, 1.0, n_users)
    return {
        "best_valid_score": 0.1,
        "valid_score_bigger": True,
        "best_valid_result": OrderedDict(("ndcg@5", 0.1) for _ in range(1)),
        "test_result": OrderedDict((key, float(np.mean(value))) for key, value in per_user.items()),
        "test_per_user": per_user,
        "num_trainable_parameters": 1000,
        "train_time_s": 1.5,
        "eval_time_s": 0.5,
        "peak_memory_gib": None,
        "device": "cpu",
    }


def fake_runner(**kwargs):
    if kwargs["model"] == "GRU4Rec" and kwargs["config_dict"]["seed"] == 2:
        raise ValueError("simulated crash in GRU4Rec")
    return fake_result(kwargs["model"], kwargs["config_dict"]["seed"])


def fake_spec(tmp_path, models, ml100k_slice) -> GridSpec:
    return GridSpec(
        models=models, datasets=["ml-100k-slice"], seeds=[1, 2], overrides=dict(ml100k_slice),
        output_dir=str(tmp_path / "board"),
    )


def test_failed_cell_is_recorded_and_the_grid_goes_on(tmp_path, ml100k_slice, capsys):
    spec = fake_spec(tmp_path, ["Pop", "GRU4Rec", "iLoRA"], ml100k_slice)
    runner = CountingRunner(fake_runner)
    run = run_grid(spec, runner=runner)
    assert len(runner.calls) == 6 and len(run.finished) == 5 and len(run.failed) == 1
    failed = [r for r in run.store.load() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["model"] == "GRU4Rec" and failed[0]["seed"] == 2
    assert failed[0]["error"] == "ValueError: simulated crash in GRU4Rec"
    assert "simulated crash" in failed[0]["traceback"] and "fake_runner" in failed[0]["traceback"]
    assert "FAILED cells" in capsys.readouterr().out
    ok = [r for r in run.store.load() if r["status"] == "ok"]
    assert ok[0]["protocol"]["test_mode"] == "uni19" and ok[0]["protocol"]["split"] == {"LS": "valid_and_test"}
    assert len(ok[0]["test_per_user"]["hit@1"]) == 30

    # The table shows the failure honestly: GRU4Rec over 1 seed, the failed run listed under the table.
    markdown = to_markdown(build_leaderboard(spec, run.store.load()))
    assert "(n=1)" in markdown and "GRU4Rec on ml-100k-slice, seed 2: failed (ValueError" in markdown

    # Rerunning retries the failed cell only.
    runner = CountingRunner(fake_runner)
    run = run_grid(spec, runner=runner)
    assert runner.calls == [("GRU4Rec", "ml-100k-slice", 2)] and len(run.skipped) == 5


def test_each_record_carries_the_command_that_reruns_its_cell(tmp_path, ml100k_slice):
    import shlex

    from recbole_ilora.overrides import parse_overrides

    spec = fake_spec(tmp_path, ["iLoRA"], ml100k_slice)
    spec.overrides.update(gate_sasrec={"epochs": 5, "hidden_size": 64}, topk=[1, 5], learning_rate=1.6e-3,
                          score_fusion=True, gate_checkpoint=None, state="WARNING", note="it's quoted",
                          number_as_text="1e-3", flag_as_text="true")
    record = run_grid(spec, runner=CountingRunner(fake_runner)).store.load()[0]
    program, script, *arguments = shlex.split(record["command"])
    assert (program, script) == ("python", "run_recbole_ilora.py")
    assert arguments[:2] == ["--model=iLoRA", "--dataset=ml-100k-slice"]
    assert "--state=WARNING" in arguments  # plain where that reads back the same
    # Read back as the command line reads it, the settings are exactly the cell's, types included.
    assert parse_overrides(arguments[2:]) == {**record["overrides"], "seed": record["seed"]}


def test_a_finished_cell_leaves_nothing_alive():
    """The grid runs its cells in one process: what a cell built (a model in a reference cycle, as a Trainer and
    its model are) is collected as the cell ends, not whenever the garbage collector gets to it."""
    import gc
    import weakref

    import torch

    from recbole_ilora.leaderboard.spec import Cell

    models = []

    def runner(**kwargs):
        model = torch.nn.Linear(4, 4)
        model.cycle = [model]  # only the cycle collector can free it
        models.append(weakref.ref(model))
        return fake_result(kwargs["model"], kwargs["config_dict"]["seed"])

    gc.disable()  # no collection but the cell's own
    try:
        record = runner_module.run_cell(Cell("Pop", "ml-100k", 1, {}, [], "hash"), runner=runner)
    finally:
        gc.enable()
    assert record["status"] == "ok" and models[0]() is None


def test_truncated_last_line_is_ignored_and_its_cell_rerun(tmp_path, ml100k_slice, caplog):
    spec = fake_spec(tmp_path, ["Pop"], ml100k_slice)
    store = run_grid(spec, runner=CountingRunner(fake_runner)).store
    text = store.path.read_text()
    store.path.write_text(text[: len(text) - 40])  # a crash in the middle of writing the second line
    assert len(store.load()) == 1 and "unreadable line 2" in caplog.text
    runner = CountingRunner(fake_runner)
    run_grid(spec, runner=runner)
    assert runner.calls == [("Pop", "ml-100k-slice", 2)]


def test_a_proposed_model_without_results_gets_no_improvement_or_significance(tmp_path, ml100k_slice):
    spec = fake_spec(tmp_path, ["Pop", "SASRec", "LLaRA", "iLoRA"], ml100k_slice)

    def proposed_crashes(**kwargs):
        if kwargs["model"] == "iLoRA":
            raise ValueError("simulated crash")
        return fake_runner(**kwargs)

    run = run_grid(spec, runner=CountingRunner(proposed_crashes))
    board = build_leaderboard(spec, run.store.load())
    assert board.significance.empty and board.improvements.empty
    markdown = to_markdown(board)
    assert "iLoRA vs" not in markdown and "†" not in markdown and "‡" not in markdown
    assert "No significance test and no improvement rows: iLoRA has no results" in markdown


def test_proposed_and_baseline_keys_drive_the_marks_and_improvement_rows(tmp_path, ml100k_slice):
    # SASRec is the proposed model and GRU4Rec its baseline; LLaRA has the best means here but, being an
    # LLM-based model, is never the "best classical" reference. The exports never mention iLoRA.
    spec = GridSpec(models=["Pop", "SASRec", "GRU4Rec", "LLaRA"], datasets=["ml-100k-slice"], seeds=[1, 3],
                    overrides=dict(ml100k_slice), output_dir=str(tmp_path / "board"), proposed="SASRec",
                    baseline="GRU4Rec")
    run = run_grid(spec, runner=CountingRunner(fake_runner))
    board = build_leaderboard(spec, run.store.load())
    assert board.llm_models == ["LLaRA"]
    assert set(board.significance.model) == {"Pop", "GRU4Rec", "LLaRA"}  # SASRec against every other model
    records = {(r["model"], r["seed"]): r["test_per_user"]["ndcg@5"] for r in run.store.load()}
    sig = board.significance.set_index(["metric", "model"]).loc[("NDCG@5", "LLaRA")]
    x, y = (np.mean([records[model, 1], records[model, 3]], axis=0) for model in ("SASRec", "LLaRA"))
    assert sig.p_value == pytest.approx(paired_test(x, y).p_value)

    improvements = board.improvements.set_index(["metric", "reference"])
    means = {metric: {model: board.mean(model, "ml-100k-slice", metric) for model in spec.models}
             for metric in board.metrics}
    assert any(mean["LLaRA"] > max(mean["Pop"], mean["GRU4Rec"]) for mean in means.values())
    for metric, mean in means.items():
        vs_baseline = improvements.loc[(metric, "GRU4Rec")]
        assert vs_baseline.relative_pct == pytest.approx((mean["SASRec"] - mean["GRU4Rec"]) / mean["GRU4Rec"] * 100)
        best = improvements.loc[(metric, "best classical")]
        assert best.reference_model == max(["Pop", "GRU4Rec"], key=mean.get)
        assert best.relative_pct == pytest.approx((mean["SASRec"] / mean[best.reference_model] - 1) * 100)
    assert set(improvements.index.get_level_values("reference")) == {"GRU4Rec", "best classical"}

    markdown = to_markdown(board)
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("|")}
    assert "SASRec vs GRU4Rec" in rows and "SASRec vs best classical" in rows
    assert not re.search("[†‡]", rows["SASRec"])  # the proposed model carries no mark of its own
    marked = board.significance[board.significance.marker != ""]
    assert len(marked)  # the fake models differ: some other model's cell is marked
    for row in marked.itertuples():
        assert row.marker in rows[row.model]
    assert "SASRec differs from that model" in markdown and "X = GRU4Rec or the best classical" in markdown
    paths = export_tables(board, tmp_path / "exports")
    paths["png"] = plot_leaderboard(board, tmp_path / "exports" / "leaderboard.png")
    for fmt in ("markdown", "csv", "latex", "json"):
        assert "iLoRA" not in paths[fmt].read_text()
    document = json.loads(paths["json"].read_text())
    assert (document["grid"]["proposed"], document["grid"]["baseline"]) == ("SASRec", "GRU4Rec")


def test_improvements_and_emphasis(tmp_path, ml100k_slice):
    spec = fake_spec(tmp_path, ["Pop", "SASRec", "LLaRA", "iLoRA"], ml100k_slice)  # proposed: iLoRA, the last
    run = run_grid(spec, runner=CountingRunner(fake_runner))
    board = build_leaderboard(spec, run.store.load())
    improvements = board.improvements.set_index(["metric", "reference"])
    assert set(improvements.index.get_level_values("reference")) == {"best classical"}  # no baseline named
    row = improvements.loc[("HR@1", "best classical")]
    assert row.reference_model == board.summary.query("model in ['Pop', 'SASRec'] and metric == 'HR@1'").set_index("model")["mean"].idxmax()
    expected = (board.mean("iLoRA", "ml-100k-slice", "HR@1") / board.mean(row.reference_model, "ml-100k-slice", "HR@1") - 1) * 100
    assert row.relative_pct == pytest.approx(expected)
    # Each significance row is scipy's Wilcoxon on per-user values averaged over the two seeds.
    records = {(r["model"], r["seed"]): r["test_per_user"]["hit@1"] for r in run.store.load()}
    x = np.mean([records["iLoRA", 1], records["iLoRA", 2]], axis=0)
    y = np.mean([records["Pop", 1], records["Pop", 2]], axis=0)
    sig = board.significance.set_index(["metric", "model"]).loc[("HR@1", "Pop")]
    assert sig.p_value == pytest.approx(paired_test(x, y).p_value) and sig.pooling == POOL_MEAN
    # Best bold, second underlined, in every metric column.
    markdown_rows = {line.split("|")[1].strip(): line for line in to_markdown(board).splitlines() if line.startswith("|")}
    for metric, column in board.summary.groupby("metric"):
        ranked = column.sort_values("mean", ascending=False)
        assert f"**{ranked['mean'].iloc[0]:.4f}" in markdown_rows[ranked.model.iloc[0]]
        assert f"<u>{ranked['mean'].iloc[1]:.4f}" in markdown_rows[ranked.model.iloc[1]]


# ----------------------------------------------------------------------------------------------------
# End to end: a real tiny grid, interrupted, resumed and exported


@pytest.fixture(scope="module")
def tiny_grid(ml100k_slice, tmp_path_factory):
    root = tmp_path_factory.mktemp("leaderboard")
    grid = {
        "models": ["Pop", "GRU4Rec", "LLaRA", "iLoRA"],
        "datasets": ["ml-100k-slice"],
        "seeds": [2020, 2021],
        "overrides": {**ml100k_slice, **FAST, "checkpoint_dir": str(root / "saved")},
        "model_overrides": {"LLaRA": dict(TINY_LLM), "iLoRA": dict(TINY_LLM)},
        "output_dir": str(root / "board"),
        "proposed": "iLoRA",
        "baseline": "LLaRA",
    }
    grid_path = root / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    spec = load_grid_spec(grid_path)
    all_cells = [(c.model, c.dataset, c.seed) for c in spec.cells()]

    interrupted = CountingRunner(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_leaderboard(grid_path, runner=interrupted)
    resumed = CountingRunner()
    outcome = run_leaderboard(grid_path, runner=resumed)
    again = CountingRunner()
    run_leaderboard(grid_path, runner=again)
    return {"spec": spec, "grid_path": grid_path, "cells": all_cells, "interrupted": interrupted,
            "resumed": resumed, "again": again, "outcome": outcome}


def test_tiny_grid_runs_every_cell(tiny_grid):
    records = ResultsStore(tiny_grid["outcome"]["results"]).load()
    failures = [f"{r['model']} seed {r['seed']}: {r['error']}" for r in records if r["status"] != "ok"]
    assert not failures, "cells failed:\n" + "\n".join(failures)
    assert sorted((r["model"], r["dataset"], r["seed"]) for r in records) == sorted(tiny_grid["cells"])
    for record in records:
        assert set(record["test_result"]) >= {"hit@1", "hit@5", "ndcg@5", "ndcg@10"}
        assert np.mean(record["test_per_user"]["hit@1"]) == pytest.approx(record["test_result"]["hit@1"], abs=1e-4)
        assert record["num_trainable_parameters"] > 0 and record["train_time_s"] > 0
        assert record["device"] == "cpu" and record["peak_memory_gib"] is None and record["timestamp"]


def test_tiny_grid_resumes_without_rerunning_finished_cells(tiny_grid):
    finished_before = tiny_grid["interrupted"].calls
    assert len(finished_before) == 3
    assert sorted(tiny_grid["resumed"].calls) == sorted(set(tiny_grid["cells"]) - set(finished_before))
    assert tiny_grid["again"].calls == []


def test_tiny_grid_exports_all_formats(tiny_grid):
    exports = tiny_grid["outcome"]["exports"]
    assert set(exports) == {"markdown", "csv", "latex", "json", "png", "validation_markdown", "validation_csv"}
    for path in exports.values():
        assert path.is_file() and path.stat().st_size > 0
    assert exports["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latex = exports["latex"].read_text()
    assert "\\begin{table}" in latex and "\\textbf{" in latex and "\\caption{" in latex
    csv = pd.read_csv(exports["csv"], index_col=0)
    assert list(csv.index[:4]) == ["Pop", "GRU4Rec", "LLaRA", "iLoRA"]
    assert "ml-100k-slice HR@1" in csv.columns and "ml-100k-slice Params" in csv.columns
    markdown = exports["markdown"].read_text()
    assert "uni19" in markdown and "2 seeds" in markdown and "Wilcoxon" in markdown
    assert "iLoRA vs LLaRA" in markdown and "iLoRA vs best classical" in markdown


def test_markdown_table_parses_back_to_the_json_numbers(tiny_grid):
    exports = tiny_grid["outcome"]["exports"]
    document = json.loads(exports["json"].read_text())
    from_json = {(r["model"], f"{r['dataset']} {r['metric']}"): r["mean"] for r in document["results"]}
    from_markdown = parse_markdown_means(exports["markdown"].read_text())
    assert set(from_markdown) == set(from_json) and len(from_json) == 4 * 4
    for key, mean in from_json.items():
        assert from_markdown[key] == pytest.approx(round(mean, 4), abs=1e-12)
    assert document["significance"] and {r["model"] for r in document["significance"]} == {"Pop", "GRU4Rec", "LLaRA"}


def test_cli_export_only_rebuilds_the_exports(tiny_grid, capsys):
    exports = tiny_grid["outcome"]["exports"]
    exports["markdown"].unlink()
    outcome = cli_main(["--leaderboard", str(tiny_grid["grid_path"]), "--export_only"])
    assert outcome["exports"]["markdown"].is_file()
    spec = tiny_grid["spec"]
    board = build_leaderboard(spec, ResultsStore(outcome["results"]).load())
    assert parse_markdown_means(outcome["exports"]["markdown"].read_text()) == {
        key: round(value, 4) for key, value in numeric_means(board).items()
    }
    # A different --key=value is a different configuration: nothing of it has run yet.
    with pytest.raises(RuntimeError, match="No finished run"):
        cli_main(["--leaderboard", str(tiny_grid["grid_path"]), "--export_only", "--epochs=2"])


# ----------------------------------------------------------------------------------------------------
# Validation-only tuning and shards (fake runner)

BEST_VALID_LR = 1e-3  # the fake runner's validation optimum ...
BEST_TEST_LR = 1e-2  # ... and a different test optimum: the choice must not see test results


def tuning_runner(**kwargs):
    """Validation score peaks at BEST_VALID_LR; test HR@1 grows with the learning rate (to 1e-2)."""
    config = kwargs["config_dict"]
    result = fake_result(kwargs["model"], config["seed"])
    lr = config.get("learning_rate", 1e-3)
    result["best_valid_score"] = 0.5 - abs(math.log10(lr) - math.log10(BEST_VALID_LR)) / 10
    result["test_result"]["hit@1"] = lr * 10
    result["test_per_user"]["hit@1"] = np.full(30, lr * 10)
    return result


def tuning_spec(tmp_path, ml100k_slice) -> GridSpec:
    """iLoRA tuned over 3 learning rates, SASRec untuned (an explicitly allowed unequal budget)."""
    return GridSpec(
        models=["SASRec", "iLoRA"], datasets=["ml-100k-slice"], seeds=[1, 2], overrides=dict(ml100k_slice),
        output_dir=str(tmp_path / "board"),
        tune={"models": ["iLoRA"], "space": {"learning_rate": [1e-4, BEST_VALID_LR, BEST_TEST_LR]},
              "allow_unequal_budgets": True},
    )


def test_tuning_chooses_on_validation_only_and_reuses_the_chosen_trial(tmp_path, ml100k_slice):
    spec = tuning_spec(tmp_path, ml100k_slice)
    assert spec.tune.seeds == [1]  # default: the first seed decides
    runner = CountingRunner(tuning_runner)
    run = run_grid(spec, runner=runner)
    # 3 trials of iLoRA (seed 1), then SASRec x 2 seeds and iLoRA seed 2; iLoRA seed 1 is the chosen trial.
    assert runner.calls == [("iLoRA", "ml-100k-slice", 1)] * 3 + [
        ("SASRec", "ml-100k-slice", 1), ("SASRec", "ml-100k-slice", 2), ("iLoRA", "ml-100k-slice", 2)]
    assert run.tuning.chosen == {("iLoRA", "ml-100k-slice"): {"learning_rate": BEST_VALID_LR}}
    assert not run.failed and len(run.finished) == 6

    board = build_leaderboard(spec, run.store.load())
    assert board.mean("iLoRA", "ml-100k-slice", "HR@1") == pytest.approx(BEST_VALID_LR * 10)
    assert board.missing.empty
    tuning = board.tuning.set_index("model")
    assert tuning.loc["iLoRA"].learning_rate.tolist() == [1e-4, BEST_VALID_LR, BEST_TEST_LR]
    assert tuning.loc["iLoRA"].chosen.tolist() == [False, True, False]
    # The untuned model is listed too, with the validation score of its only settings.
    untuned = tuning.loc["SASRec"]
    assert untuned.learning_rate is None and untuned.chosen
    assert untuned.valid_score == pytest.approx(tuning_runner(model="SASRec", config_dict={"seed": 1})["best_valid_score"])
    markdown = to_markdown(board)
    assert "**Tuning.**" in markdown and "✓" in markdown
    assert re.search(r"\| SASRec +\| ml-100k-slice \| — ", markdown)
    assert CountingRunner(tuning_runner).calls == [] and run_grid(spec, runner=CountingRunner(tuning_runner)).finished == []


def test_unfinished_tuning_leaves_final_cells_waiting_and_listed(tmp_path, ml100k_slice):
    spec = tuning_spec(tmp_path, ml100k_slice)

    def crash_on_one_trial(**kwargs):
        if kwargs["config_dict"].get("learning_rate") == 1e-4:
            raise ValueError("simulated crash")
        return tuning_runner(**kwargs)

    run = run_grid(spec, runner=CountingRunner(crash_on_one_trial))
    assert run.tuning.incomplete == [("iLoRA", "ml-100k-slice")] and len(run.failed) == 1
    board = build_leaderboard(spec, run.store.load())
    waiting = board.missing[board.missing.model == "iLoRA"]
    assert waiting.status.tolist() == ["awaiting tuning"] * 2
    runner = CountingRunner(tuning_runner)  # the retry runs the failed trial, then iLoRA's other seed
    run_grid(spec, runner=runner)
    assert runner.calls == [("iLoRA", "ml-100k-slice", 1), ("iLoRA", "ml-100k-slice", 2)]


def test_tuning_spec_mistakes_are_refused(tmp_path, ml100k_slice):
    base = dict(models=["SASRec", "iLoRA"], datasets=["ml-100k"], seeds=[1, 2])
    for tune, message in [
        ({"space": {}}, "tune.space"),
        ({"space": {"learning_rate": 1e-3}}, "non-empty list"),
        ({"space": {"seed": [1, 2]}}, "cannot tune `seed`"),
        ({"space": {"SASRec": {"seed": [1, 2]}, "iLoRA": {"learning_rate": [1e-3, 2e-3]}}}, "cannot tune `seed`"),
        ({"models": ["GRU4Rec"], "space": {"learning_rate": [1e-3]}, "allow_unequal_budgets": True}, "not in the grid"),
        ({"space": {"GRU4Rec": {"learning_rate": [1e-3]}}, "allow_unequal_budgets": True}, "not in the grid"),
        ({"seeds": [3], "space": {"learning_rate": [1e-3]}}, "subset of the grid's seeds"),
        ({"space": {"learning_rate": [1e-3]}, "metric": "hit@1"}, "unknown keys"),
        ({"space": {"SASRec": [1e-3], "learning_rate": [1e-3]}}, "mixes models"),
        ({"models": ["iLoRA"], "space": {"iLoRA": {"learning_rate": [1e-3]}}}, "only applies to a shared"),
        ({"space": {"learning_rate": [1e-3]}, "allow_unequal_budgets": "yes"}, "true or false"),
    ]:
        with pytest.raises(GridSpecError, match=message):
            GridSpec(**base, tune=tune)
    spec = tuning_spec(tmp_path, ml100k_slice)
    with pytest.raises(GridSpecError, match="tuned by the grid"):
        spec.cells({"learning_rate": 1e-3})
    with pytest.raises(GridSpecError, match="shard must be I/N"):
        run_grid(spec, shard="2/2")


def budget_runner(**kwargs):
    """tuning_runner whose validation score also prefers train_batch_size 256 (what SASRec tunes)."""
    result = tuning_runner(**kwargs)
    result["best_valid_score"] -= abs(kwargs["config_dict"].get("train_batch_size", 256) - 256) / 1e5
    return result


def test_every_model_is_tuned_with_the_same_budget(tmp_path, ml100k_slice):
    space = {
        "SASRec": {"learning_rate": [BEST_VALID_LR, BEST_TEST_LR], "train_batch_size": [2048, 256]},
        "iLoRA": {"learning_rate": [1e-4, 3e-4, BEST_VALID_LR, BEST_TEST_LR]},
    }
    base = dict(models=["SASRec", "iLoRA"], datasets=["ml-100k-slice"], seeds=[1, 2], overrides=dict(ml100k_slice),
                output_dir=str(tmp_path / "board"))
    spec = GridSpec(**base, tune={"space": space})
    assert spec.tuned_models == ["SASRec", "iLoRA"] and [spec.tune.budget(m) for m in spec.models] == [4, 4]
    runner = CountingRunner(budget_runner)
    run = run_grid(spec, runner=runner)
    # 4 validation trials of each model on seed 1 (the chosen one is also seed 1's final cell), then seed 2.
    calls = pd.Series([f"{model} {seed}" for model, _, seed in runner.calls]).value_counts().to_dict()
    assert calls == {"SASRec 1": 4, "iLoRA 1": 4, "SASRec 2": 1, "iLoRA 2": 1}
    assert run.tuning.chosen == {("SASRec", "ml-100k-slice"): {"learning_rate": BEST_VALID_LR, "train_batch_size": 256},
                                 ("iLoRA", "ml-100k-slice"): {"learning_rate": BEST_VALID_LR}}
    board = build_leaderboard(spec, run.store.load())
    assert board.mean("SASRec", "ml-100k-slice", "HR@1") == pytest.approx(BEST_VALID_LR * 10)  # not the test optimum
    trials = pd.DataFrame(json.loads(to_json(board))["tuning"])
    assert trials.groupby("model").size().to_dict() == {"SASRec": 4, "iLoRA": 4} and trials.valid_score.notna().all()
    assert "— = a setting that model does not tune" in to_markdown(board)

    # Spaces of different sizes are refused, unless the grid explicitly allows them.
    unequal = {**space, "iLoRA": {"learning_rate": [1e-4, BEST_VALID_LR, BEST_TEST_LR]}}
    with pytest.raises(GridSpecError, match=r"different numbers of trials \(SASRec: 4, iLoRA: 3\)"):
        GridSpec(**base, tune={"space": unequal})
    assert GridSpec(**base, tune={"space": unequal, "allow_unequal_budgets": True}).tune.budget("iLoRA") == 3
    # A model without a space counts as one trial; a shared space gives every model the same trials.
    with pytest.raises(GridSpecError, match=r"SASRec: 1 \(untuned\), iLoRA: 4"):
        GridSpec(**base, tune={"space": {"iLoRA": space["iLoRA"]}})
    shared = GridSpec(**base, tune={"space": {"learning_rate": [1e-4, 1e-3]}}).tune
    assert shared.trials("SASRec") == shared.trials("iLoRA") == [{"learning_rate": 1e-4}, {"learning_rate": 1e-3}]


def test_two_shards_split_the_grid_and_wait_for_each_others_trials(tmp_path, ml100k_slice, monkeypatch):
    monkeypatch.setattr(runner_module, "SHARD_WAIT_S", 0.05)
    spec = tuning_spec(tmp_path, ml100k_slice)
    runners = [CountingRunner(tuning_runner), CountingRunner(tuning_runner)]
    outcomes = [None, None]

    def shard(index):
        outcomes[index] = run_grid(spec, runner=runners[index], shard=f"{index}/2")

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    calls = runners[0].calls + runners[1].calls
    assert sorted(calls) == sorted([("iLoRA", "ml-100k-slice", 1)] * 3 + [
        ("SASRec", "ml-100k-slice", 1), ("SASRec", "ml-100k-slice", 2), ("iLoRA", "ml-100k-slice", 2)])
    assert len(runners[0].calls) == 3 and len(runners[1].calls) == 3  # every other pending cell
    assert all(o.tuning.chosen == {("iLoRA", "ml-100k-slice"): {"learning_rate": BEST_VALID_LR}} for o in outcomes)
    records = ResultsStore(outcomes[0].store.path).load()
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)


def test_claiming_shards_never_run_a_cell_twice(tmp_path, ml100k_slice, monkeypatch):
    monkeypatch.setattr(runner_module, "SHARD_WAIT_S", 0.05)
    spec = tuning_spec(tmp_path, ml100k_slice)
    runners = [CountingRunner(tuning_runner) for _ in range(3)]
    threads = [threading.Thread(target=run_grid, args=(spec,),
                                kwargs={"runner": runners[i], "shard": f"{i}/3", "run_id": "r1"}) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    calls = [call for runner in runners for call in runner.calls]
    assert sorted(calls) == sorted([("iLoRA", "ml-100k-slice", 1)] * 3 + [
        ("SASRec", "ml-100k-slice", 1), ("SASRec", "ml-100k-slice", 2), ("iLoRA", "ml-100k-slice", 2)])
    records = ResultsStore(tmp_path / "board" / "results.jsonl").load()
    assert len([r for r in records if r["status"] == "ok"]) == 6
    assert len([r for r in records if r["status"] == "claimed"]) == 6
    # A later run (another run id) resumes normally: nothing left, nothing rerun.
    again = CountingRunner(tuning_runner)
    run_grid(spec, runner=again, shard="0/2", run_id="r2")
    assert again.calls == []


def test_shard_command_line_drops_jobs_and_adds_shard_and_run_id():
    argv = ["--leaderboard", "g.yaml", "--jobs", "3", "--epochs=2", "--jobs=3", "--no_save"]
    assert shard_argv(argv, 1, 3, "abc") == ["--leaderboard", "g.yaml", "--epochs=2", "--no_save", "--shard=1/3",
                                             "--run_id=abc"]


def test_cli_jobs_runs_shard_processes_into_one_results_file(tmp_path, ml100k_slice):
    grid = {"models": ["Pop"], "datasets": ["ml-100k-slice"], "seeds": [1, 2, 3],
            "overrides": {**ml100k_slice, **FAST, "checkpoint_dir": str(tmp_path / "saved")},
            "output_dir": str(tmp_path / "board")}
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    outcome = cli_main(["--leaderboard", str(grid_path), "--jobs", "2", "--no_save"])
    assert outcome["failed_jobs"] == []
    records = ResultsStore(outcome["results"]).load()
    ok = [r for r in records if r["status"] == "ok"]
    claims = [r for r in records if r["status"] == "claimed"]
    assert sorted(r["seed"] for r in ok) == [1, 2, 3] and len(records) == len(ok) + len(claims)
    assert sorted(r["seed"] for r in claims) == [1, 2, 3] and len({r["run_id"] for r in claims}) == 1
    logs = [(tmp_path / "board" / f"shard-{i}.log").read_text() for i in range(2)]
    assert "shard 0/2" in logs[0] and "shard 1/2" in logs[1]
    assert outcome["exports"]["markdown"].is_file()


def fake_runner_with_fusion(**kwargs):
    """iLoRA's results with a score_fusion section: its fused vectors are LLaRA-like (other numbers than the plain)."""
    result = fake_result(kwargs["model"], kwargs["config_dict"]["seed"])
    if kwargs["model"] == "iLoRA":
        fused = fake_result("LLaRA", kwargs["config_dict"]["seed"] + 10)
        result["score_fusion"] = {"weight": 0.5, "valid_by_weight": {0.0: 0.1, 0.5: 0.2},
                                  "best_valid_result": {"ndcg@5": 0.2}, "test_result": fused["test_result"],
                                  "test_per_user": fused["test_per_user"], "eval_time_s": 0.25}
    return result


def fake_runner_with_curves(**kwargs):
    """LLM results with a learning curve of 3 epochs (values known from model, seed and epoch) and a fusion section."""
    result = fake_runner_with_fusion(**kwargs)
    seed = kwargs["config_dict"]["seed"]
    if kwargs["model"] in ("iLoRA", "LLaRA"):
        offset = 0.1 if kwargs["model"] == "iLoRA" else 0.0
        result["learning_curve"] = [
            {"epoch": epoch, "optimizer_steps": 10 * epoch, "valid_score": 0.1 * epoch,
             "test_result": {"hit@1": offset + 0.1 * epoch + 0.01 * seed, "ndcg@5": offset + 0.2 * epoch,
                             "hit@5": 0.9}}
            for epoch in (1, 2, 3)]
    return result


def test_learning_curves_are_exported_per_epoch_as_means_over_seeds(tmp_path, ml100k_slice):
    spec = fake_spec(tmp_path, ["SASRec", "iLoRA", "LLaRA"], ml100k_slice)
    spec.proposed = "iLoRA"
    run = run_grid(spec, runner=CountingRunner(fake_runner_with_curves))
    board = build_leaderboard(spec, run.store.load())
    curves = board.curves.set_index(["model", "epoch", "metric"])
    # Seeds 1 and 2: HR@1 = offset + 0.1 epoch + 0.01 seed, so the mean has 0.015 and the std is that of (0.01, 0.02).
    assert curves.loc[("iLoRA", 2, "HR@1"), "mean"] == pytest.approx(0.1 + 0.2 + 0.015)
    assert curves.loc[("iLoRA", 2, "HR@1"), "std"] == pytest.approx(np.std([0.01, 0.02], ddof=1))
    assert curves.loc[("LLaRA", 3, "NDCG@5"), "mean"] == pytest.approx(0.6)
    assert curves.loc[("LLaRA", 3, "NDCG@5"), "optimizer_steps"] == 30
    # HR@1 and NDCG@5 only; no curve for SASRec (none recorded) nor for the fusion row (its weight comes after training).
    assert set(board.curves.metric) == {"HR@1", "NDCG@5"}
    assert set(board.curves.model) == {"iLoRA", "LLaRA"} and len(board.curves) == 2 * 3 * 2

    paths = export_leaderboard(spec, run.store, tmp_path / "exports")
    markdown = paths["curves_markdown"].read_text()
    assert "| ml-100k-slice, epoch 2 |" in markdown and "iLoRA HR@1" in markdown and "SASRec" not in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| ml-100k-slice, epoch 2"))
    assert f"{0.315:.4f} ± {np.std([0.01, 0.02], ddof=1):.4f}" in row
    assert pd.read_csv(paths["curves_csv"]).shape == (12, 8)
    assert paths["curves_png"].stat().st_size > 10_000
    assert len(json.loads(paths["json"].read_text())["learning_curves"]) == 12


def test_a_grid_without_curves_writes_no_curve_files(tmp_path, ml100k_slice):
    spec = fake_spec(tmp_path, ["SASRec", "iLoRA"], ml100k_slice)
    spec.proposed = "iLoRA"
    run = run_grid(spec, runner=CountingRunner(fake_runner_with_fusion))
    paths = export_leaderboard(spec, run.store, tmp_path / "exports")
    assert not {"curves_markdown", "curves_csv", "curves_png"} & set(paths)
    assert not (tmp_path / "exports" / "learning_curves.md").exists()


def test_a_score_fusion_section_adds_a_derived_row_after_its_model(tmp_path, ml100k_slice):
    spec = fake_spec(tmp_path, ["SASRec", "iLoRA", "LLaRA"], ml100k_slice)
    spec.proposed = "iLoRA"
    run = run_grid(spec, runner=CountingRunner(fake_runner_with_fusion))
    records = run.store.load()
    board = build_leaderboard(spec, records)
    assert board.models == ["SASRec", "iLoRA", "iLoRA + SASRec fusion", "LLaRA"]
    assert "iLoRA + SASRec fusion" in board.llm_models  # not a classical model
    stored = {r["seed"]: r for r in records if r["model"] == "iLoRA"}
    for seed, record in stored.items():
        assert record["score_fusion"]["valid_by_weight"] == [[0.0, 0.1], [0.5, 0.2]]  # JSON: pairs, not string keys
    for label, key in (("HR@1", "hit@1"), ("NDCG@10", "ndcg@10")):
        fused = np.mean([r["score_fusion"]["test_result"][key] for r in stored.values()])
        plain = np.mean([r["test_result"][key] for r in stored.values()])
        assert board.mean("iLoRA + SASRec fusion", "ml-100k-slice", label) == pytest.approx(fused)
        assert board.mean("iLoRA", "ml-100k-slice", label) == pytest.approx(plain)  # never mixed with the fused
    costs = board.costs.set_index("model")
    assert costs.loc["iLoRA + SASRec fusion", "eval_time_s"] == 0.25 and costs.loc["iLoRA", "eval_time_s"] == 0.5
    assert "iLoRA + SASRec fusion" in set(board.significance.model)  # tested against the proposed iLoRA
    markdown_rows = [line.split("|")[1].strip() for line in to_markdown(board).splitlines() if line.startswith("|")]
    assert markdown_rows.index("iLoRA + SASRec fusion") == markdown_rows.index("iLoRA") + 1
    exported = json.loads(to_json(board))
    assert "iLoRA + SASRec fusion" in exported["grid"]["models"]
    assert "iLoRA + SASRec fusion" in export_tables(board, tmp_path / "exports")["markdown"].read_text()


# ----------------------------------------------------------------------------------------------------
# Variants: rows that run a model with extra settings (fake runner)

VARIANT = "iLoRA + listwise"


class RecordingRunner:
    """A fake runner that keeps every call's keyword arguments (model, config_dict, ...)."""

    def __init__(self, result=lambda **kwargs: fake_result(kwargs["model"], kwargs["config_dict"]["seed"])):
        self.result = result
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.result(**kwargs)

    def config_of(self, model: str, seed: int) -> dict:
        """The config_dict of the one call that ran ``model`` (the registered model) with ``seed``."""
        (config,) = [c["config_dict"] for c in self.calls if c["model"] == model and c["config_dict"]["seed"] == seed]
        return config


def variant_grid(tmp_path, ml100k_slice, **changes) -> dict:
    """Every layer sets the keys of the layers after it too, so each key's value tells which layer won."""
    grid = {
        "models": ["SASRec", "iLoRA", VARIANT],
        "datasets": ["ml-100k-slice"],
        "seeds": [1],
        "overrides": {**ml100k_slice, "epochs": 1, "learning_rate": 0.1, "weight_decay": 0.1, "train_batch_size": 16,
                      "eval_batch_size": 16, "stopping_step": 1},
        "dataset_overrides": {"ml-100k-slice": {"learning_rate": 0.2, "weight_decay": 0.2, "train_batch_size": 32,
                                                "eval_batch_size": 32, "stopping_step": 2}},
        "model_overrides": {"iLoRA": {"weight_decay": 0.3, "train_batch_size": 48, "eval_batch_size": 48,
                                      "stopping_step": 3}},
        "variants": {VARIANT: {"model": "iLoRA", "overrides": {"train_batch_size": 64, "eval_batch_size": 64,
                                                               "stopping_step": 4, "listwise_loss_weight": 1.0}}},
        "cell_overrides": [{"model": VARIANT, "overrides": {"eval_batch_size": 80, "stopping_step": 5}}],
        "output_dir": str(tmp_path / "board"),
    }
    grid.update(changes)
    return grid


def write_grid(tmp_path, grid: dict, name: str = "grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return load_grid_spec(path)


def test_a_variant_row_runs_its_model_with_its_overrides_merged_in_order(tmp_path, ml100k_slice):
    spec = write_grid(tmp_path, variant_grid(tmp_path, ml100k_slice))
    runner = RecordingRunner()
    run = run_grid(spec, cli_overrides={"stopping_step": 6}, runner=runner)
    assert not run.failed and sorted(c["model"] for c in runner.calls) == ["SASRec", "iLoRA", "iLoRA"]
    variant = [c["config_dict"] for c in runner.calls if c["config_dict"].get("listwise_loss_weight") == 1.0]
    plain = [c["config_dict"] for c in runner.calls if c["model"] == "iLoRA" and "listwise_loss_weight" not in c["config_dict"]]
    assert len(variant) == 1 and len(plain) == 1
    wanted = {"epochs": 1, "learning_rate": 0.2, "weight_decay": 0.3, "train_batch_size": 64, "eval_batch_size": 80,
              "stopping_step": 6, "listwise_loss_weight": 1.0, "seed": 1}
    assert {key: variant[0][key] for key in wanted} == wanted  # overrides < dataset < iLoRA's < variant < cell < CLI
    # The plain iLoRA row gets neither the variant's settings nor the cell_overrides of the variant's row.
    assert {key: plain[0][key] for key in ("train_batch_size", "eval_batch_size", "stopping_step")} == {
        "train_batch_size": 48, "eval_batch_size": 48, "stopping_step": 6}
    assert runner.config_of("SASRec", 1)["weight_decay"] == 0.2  # iLoRA's model_overrides are iLoRA's only
    records = {r["model"]: r for r in run.store.load()}
    assert set(records) == {"SASRec", "iLoRA", VARIANT} and all(r["status"] == "ok" for r in records.values())
    assert records[VARIANT]["run_model"] == "iLoRA" and records[VARIANT]["overrides"]["listwise_loss_weight"] == 1.0
    assert "run_model" not in records["iLoRA"] and "run_model" not in records["SASRec"]  # plain records unchanged
    assert records[VARIANT]["protocol"] == records["iLoRA"]["protocol"]  # read from iLoRA's config


def test_a_changed_variant_reruns_its_cells_only(tmp_path, ml100k_slice):
    grid = variant_grid(tmp_path, ml100k_slice)
    spec = write_grid(tmp_path, grid)
    run_grid(spec, runner=RecordingRunner())
    hashes = {cell.model: cell.config_hash for cell in spec.cells()}
    # Plain rows hash as in a grid without variants: adding a variant leaves existing results valid.
    plain_grid = {key: value for key, value in grid.items() if key not in ("variants", "cell_overrides")}
    plain_grid["models"] = ["SASRec", "iLoRA"]
    plain = {cell.model: cell.config_hash for cell in write_grid(tmp_path, plain_grid, "plain.yaml").cells()}
    assert plain == {model: hashes[model] for model in ("SASRec", "iLoRA")}

    runner = RecordingRunner()
    assert run_grid(spec, runner=runner).finished == [] and runner.calls == []  # resumes: nothing to run

    changed = variant_grid(tmp_path, ml100k_slice)
    changed["variants"][VARIANT]["overrides"]["listwise_loss_weight"] = 0.5
    spec = write_grid(tmp_path, changed)
    new_hashes = {cell.model: cell.config_hash for cell in spec.cells()}
    assert new_hashes[VARIANT] != hashes[VARIANT]
    assert {m: new_hashes[m] for m in ("SASRec", "iLoRA")} == {m: hashes[m] for m in ("SASRec", "iLoRA")}
    runner = RecordingRunner()
    run = run_grid(spec, runner=runner)
    assert [(c["model"], c["config_dict"]["listwise_loss_weight"]) for c in runner.calls] == [("iLoRA", 0.5)]
    assert run.finished[0]["model"] == VARIANT and run.finished[0]["run_model"] == "iLoRA"
    assert run.finished[0]["config_hash"] == new_hashes[VARIANT]

    # The same settings run by another model are another configuration: the model is part of the hash.
    of_model = {}
    for model in ("iLoRA", "LLaRA"):
        other = variant_grid(tmp_path, ml100k_slice, model_overrides={})  # the same merged settings for both
        other["variants"][VARIANT]["model"] = model
        cell = {c.model: c for c in write_grid(tmp_path, other).cells()}[VARIANT]
        of_model[model] = (cell.overrides, cell.config_hash)
    assert of_model["iLoRA"][0] == of_model["LLaRA"][0] and of_model["iLoRA"][1] != of_model["LLaRA"][1]


def test_variants_are_tuned_by_row_name_with_the_same_budget(tmp_path, ml100k_slice):
    base = dict(models=["iLoRA", VARIANT], datasets=["ml-100k-slice"], seeds=[1, 2], overrides=dict(ml100k_slice),
                output_dir=str(tmp_path / "board"),
                variants={VARIANT: {"model": "iLoRA", "overrides": {"listwise_loss_weight": 1.0}}})
    with pytest.raises(GridSpecError, match=rf"different numbers of trials \(iLoRA: 2, {re.escape(VARIANT)}: 1 \(untuned\)\)"):
        GridSpec(**base, tune={"space": {"iLoRA": {"learning_rate": [1e-4, BEST_VALID_LR]}}})
    spec = GridSpec(**base, tune={"space": {"iLoRA": {"learning_rate": [1e-4, BEST_VALID_LR]},
                                            VARIANT: {"learning_rate": [BEST_VALID_LR, BEST_TEST_LR]}}})
    trials = {(c.model, c.trial["learning_rate"]): c for c in spec.tuning_cells()}
    assert set(trials) == {("iLoRA", 1e-4), ("iLoRA", BEST_VALID_LR), (VARIANT, BEST_VALID_LR), (VARIANT, BEST_TEST_LR)}
    assert trials[VARIANT, BEST_TEST_LR].run_model == "iLoRA"
    assert trials[VARIANT, BEST_TEST_LR].overrides["listwise_loss_weight"] == 1.0
    run = run_grid(spec, runner=RecordingRunner(tuning_runner))
    assert run.tuning.chosen == {("iLoRA", "ml-100k-slice"): {"learning_rate": BEST_VALID_LR},
                                 (VARIANT, "ml-100k-slice"): {"learning_rate": BEST_VALID_LR}}
    finals = [r for r in run.store.load() if r["model"] == VARIANT and r["seed"] == 2]
    assert len(finals) == 1 and finals[0]["overrides"]["learning_rate"] == BEST_VALID_LR


@pytest.mark.parametrize("variants, models, message", [
    ({"iLoRA + x": {"model": "iLoRA"}}, ["iLoRA"], r"`variants.iLoRA \+ x` is not listed in `models`; add"),
    ({"SASRec": {"model": "SASRec", "overrides": {"hidden_size": 32}}}, ["SASRec"],
     r"`variants.SASRec`: SASRec is a registered model's name; give the variant a name of its own"),
    ({VARIANT: {"model": "iLoRA", "override": {"a": 1}}}, None, r"`variants.iLoRA \+ listwise` has unknown keys \['override'\]"),
    ({VARIANT: {"overrides": {"listwise_loss_weight": 1.0}}}, None, r"`variants.iLoRA \+ listwise` lacks `model`"),
    ({VARIANT: {"model": "ilora"}}, None, r"Unknown model 'ilora' \(`variants.iLoRA \+ listwise.model`\).*Did you mean iLoRA"),
    ({VARIANT: {"model": VARIANT}}, None, r"`variants.iLoRA \+ listwise.model: iLoRA \+ listwise` is itself a variant"),
    ({VARIANT: {"model": "iLoRA", "overrides": {"seed": 3}}}, None,
     r"`seed` is set in variants.iLoRA \+ listwise.overrides"),
    ({VARIANT: {"model": "iLoRA", "overrides": [1]}}, None, r"`variants.iLoRA \+ listwise.overrides` must be a mapping"),
    ({VARIANT: "iLoRA"}, None, r"`variants.iLoRA \+ listwise` must be a mapping"),
    ([VARIANT], None, r"`variants` must map row names"),
    ({}, ["SASRec", "SASrec"], r"Unknown model 'SASrec' \(`models`\).*Did you mean SASRec"),
    ({}, ["iLoRA", "iLoRA + x"], r"Unknown model 'iLoRA \+ x' \(`models`\).*declared in `variants`"),
])
def test_variant_mistakes_are_refused(variants, models, message):
    with pytest.raises(GridSpecError, match=message):
        GridSpec(models=models or ["SASRec", "iLoRA", VARIANT], datasets=["d"], seeds=[1], variants=variants)


def test_model_overrides_of_a_variant_row_are_refused(caplog):
    with pytest.raises(GridSpecError, match=r"`model_overrides.iLoRA \+ listwise` names a variant; put its settings in "
                                            r"`variants.iLoRA \+ listwise.overrides`"):
        GridSpec(models=["iLoRA", VARIANT], datasets=["d"], seeds=[1], variants={VARIANT: {"model": "iLoRA"}},
                 model_overrides={VARIANT: {"learning_rate": 1e-3}})
    # The model_overrides of a model that only variants run are used (by them), so no "unused" warning.
    spec = GridSpec(models=["SASRec", VARIANT], datasets=["d"], seeds=[1], variants={VARIANT: {"model": "iLoRA"}},
                    model_overrides={"iLoRA": {"learning_rate": 1e-3}, "GRU4Rec": {"learning_rate": 1e-2}})
    assert spec.cell_settings(VARIANT, "d", 1) == {"learning_rate": 1e-3}
    assert "'GRU4Rec', which is not in the grid" in caplog.text and "'iLoRA'" not in caplog.text


def ablation_result(**kwargs):
    """fake_result of the model run, with: a SASRec variant (hidden_size 32) as good as LLaRA and a LLaRA variant
    (user_token) as good as iLoRA; a score_fusion section for plugin models; validation results of every metric
    that differ by model row and seed."""
    config, model = kwargs["config_dict"], kwargs["model"]
    seed = config["seed"]
    quality = "LLaRA" if config.get("hidden_size") == 32 else "iLoRA" if config.get("user_token") else model
    result = fake_result(quality, seed + (5 if quality != model else 0))
    offset = 0.01 * seed + (0.3 if config.get("user_token") else 0.0) + (0.2 if config.get("hidden_size") == 32 else 0.0)
    result["best_valid_result"] = OrderedDict((key, value / 2 + offset) for key, value in result["test_result"].items())
    if model in ("iLoRA", "LLaRA"):
        fused = fake_result("SASRec", seed + 20)
        result["score_fusion"] = {"weight": 0.5, "valid_by_weight": {0.0: 0.1, 0.5: 0.2},
                                  "best_valid_result": {key: value / 3 + offset for key, value in fused["test_result"].items()},
                                  "test_result": fused["test_result"], "test_per_user": fused["test_per_user"],
                                  "eval_time_s": 0.25}
    return result


def ablation_spec(tmp_path, ml100k_slice) -> GridSpec:
    return GridSpec(
        models=["Pop", "SASRec", "SASRec + h32", "LLaRA + user token", "iLoRA"], datasets=["ml-100k-slice"],
        seeds=[1, 2], overrides=dict(ml100k_slice), output_dir=str(tmp_path / "board"),
        variants={"SASRec + h32": {"model": "SASRec", "overrides": {"hidden_size": 32}},
                  "LLaRA + user token": {"model": "LLaRA", "overrides": {"user_token": True}}},
    )


def test_a_variant_of_an_llm_model_is_an_llm_row_and_a_classical_variant_is_classical(tmp_path, ml100k_slice):
    spec = ablation_spec(tmp_path, ml100k_slice)
    run = run_grid(spec, runner=RecordingRunner(ablation_result))
    assert not run.failed
    board = build_leaderboard(spec, run.store.load())
    fusion = "LLaRA + user token + SASRec fusion"
    assert board.models == ["Pop", "SASRec", "SASRec + h32", "LLaRA + user token", fusion, "iLoRA", "iLoRA + SASRec fusion"]
    assert board.llm_models == ["LLaRA + user token", fusion, "iLoRA", "iLoRA + SASRec fusion"]
    classical = ["Pop", "SASRec", "SASRec + h32"]
    improvements = board.improvements.set_index(["metric", "reference"])
    means = {metric: {model: board.mean(model, "ml-100k-slice", metric) for model in board.models} for metric in board.metrics}
    # The LLM variant beats every classical row somewhere: were it taken for classical, it would be the reference there.
    assert any(mean["LLaRA + user token"] > max(mean[m] for m in classical) for mean in means.values())
    for metric, mean in means.items():
        best = improvements.loc[(metric, "best classical")]
        assert best.reference_model == max(classical, key=mean.get)
    assert "SASRec + h32" in set(improvements.reference_model)  # the classical variant is a candidate
    # The variant's fusion row holds its fused results.
    fused = [r["score_fusion"]["test_result"]["hit@1"] for r in run.store.load() if r["model"] == "LLaRA + user token"]
    assert board.mean(fusion, "ml-100k-slice", "HR@1") == pytest.approx(np.mean(fused))
    # The JSON export says what each variant row runs.
    grid = json.loads(to_json(board))["grid"]
    assert grid["variants"] == {row: {"model": entry["model"], "overrides": entry["overrides"]}
                                for row, entry in spec.variants.items()}
    assert grid["variants"]["SASRec + h32"]["model"] == "SASRec"


def parse_validation_csv(path) -> dict[tuple[str, str], float]:
    table = pd.read_csv(path, index_col=0, dtype=str, keep_default_na=False)
    return {(model, column): float(cell.split(" ")[0]) for model, row in table.iterrows()
            for column, cell in row.items() if cell != "—"}


def test_the_validation_table_holds_the_means_of_best_valid_result(tmp_path, ml100k_slice):
    spec = ablation_spec(tmp_path, ml100k_slice)
    run = run_grid(spec, runner=RecordingRunner(ablation_result))
    records = run.store.load()
    board = build_leaderboard(spec, records)
    paths = export_tables(board, tmp_path / "exports")
    assert paths["validation_markdown"].name == "validation.md" and paths["validation_csv"].name == "validation.csv"
    shown = parse_validation_csv(paths["validation_csv"])
    expected = {}
    for model in spec.models:
        rows = [r for r in records if r["model"] == model]
        for label, key in (("HR@1", "hit@1"), ("HR@5", "hit@5"), ("NDCG@5", "ndcg@5"), ("NDCG@10", "ndcg@10")):
            expected[model, f"ml-100k-slice {label}"] = np.mean([r["best_valid_result"][key] for r in rows])
            if rows[0].get("score_fusion"):  # a fusion row: the fused validation results
                expected[model + " + SASRec fusion", f"ml-100k-slice {label}"] = np.mean(
                    [r["score_fusion"]["best_valid_result"][key] for r in rows])
    assert set(shown) == set(expected) and len(expected) == 7 * 4
    for key, mean in expected.items():
        assert shown[key] == pytest.approx(round(mean, 4), abs=1e-12), key
    # Validation differs from test: the file is not a copy of the test table.
    assert shown["iLoRA", "ml-100k-slice HR@1"] != pytest.approx(board.mean("iLoRA", "ml-100k-slice", "HR@1"), abs=1e-3)
    markdown = paths["validation_markdown"].read_text()
    assert markdown.startswith("**Validation.**") and "| LLaRA + user token + SASRec fusion |" in markdown
    assert json.loads(paths["json"].read_text())["validation"]
    # Exporting again writes the same bytes (--export_only is deterministic).
    before = {fmt: path.read_bytes() for fmt, path in paths.items()}
    again = export_tables(build_leaderboard(spec, ResultsStore(run.store.path).load()), tmp_path / "exports")
    assert {fmt: path.read_bytes() for fmt, path in again.items()} == before


def test_a_metric_without_validation_results_is_shown_as_missing(tmp_path, ml100k_slice):
    spec = fake_spec(tmp_path, ["Pop", "iLoRA"], ml100k_slice)  # fake_result validates on NDCG@5 only
    board = build_leaderboard(spec, run_grid(spec, runner=CountingRunner(fake_runner)).store.load())
    shown = parse_validation_csv(export_tables(board, tmp_path / "exports")["validation_csv"])
    assert shown == {("Pop", "ml-100k-slice NDCG@5"): 0.1, ("iLoRA", "ml-100k-slice NDCG@5"): 0.1}


def test_a_learning_curve_is_recorded_with_json_floats(tmp_path, ml100k_slice):
    curve = [{"epoch": 1, "optimizer_steps": np.int64(4), "valid_score": np.float32(0.25),
              "test_result": OrderedDict([("hit@1", np.float64(0.125)), ("ndcg@5", np.float32(0.5))])},
             {"epoch": 2, "optimizer_steps": None, "valid_score": 0.375, "test_result": {"hit@1": 0.25}}]

    def with_curve(**kwargs):
        result = fake_result(kwargs["model"], kwargs["config_dict"]["seed"])
        result["learning_curve"] = curve if kwargs["model"] == "iLoRA" else []
        return result

    spec = fake_spec(tmp_path, ["SASRec", "iLoRA"], ml100k_slice)
    run_grid(spec, runner=RecordingRunner(with_curve))
    lines = [json.loads(line) for line in (tmp_path / "board" / "results.jsonl").read_text().splitlines()]
    by_model = {(r["model"], r["seed"]): r for r in lines}
    assert by_model["iLoRA", 1]["learning_curve"] == [
        {"epoch": 1, "optimizer_steps": 4, "valid_score": 0.25, "test_result": {"hit@1": 0.125, "ndcg@5": 0.5}},
        {"epoch": 2, "optimizer_steps": None, "valid_score": 0.375, "test_result": {"hit@1": 0.25}}]
    assert "learning_curve" not in by_model["SASRec", 1]  # an empty curve is not recorded


def test_a_record_names_the_gpu_that_ran_it(monkeypatch):
    from recbole_ilora.utils import device_description

    assert device_description("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_description("cuda") == "cuda (NVIDIA H200)"
    assert device_description(torch.device("cuda", 0)) == "cuda (NVIDIA H200)"
