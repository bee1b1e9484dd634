"""The leaderboard table: per-seed records aggregated with pandas into tidy frames, and laid out as a table.

Rows are models (in grid order), columns are dataset x metric, and each cell is the mean ± sample
standard deviation (ddof=1) over seeds. In every metric column the best mean is bold and the second
best underlined (ties share the mark; compared at the 4 printed decimals). If the grid's ``proposed``
model has results, each other model's cell carries † (p < 0.05) or ‡ (p < 0.01) when a paired test over
test users (:mod:`recbole_ilora.leaderboard.significance`) finds the proposed model different from it,
and extra rows give the proposed model's relative improvement over the grid's ``baseline`` and over the
best classical model of that column (classical: not one of this plugin's LLM-based models; a variant
is as LLM-based as the model it runs). Cost columns
(trainable parameters, training and test wall time, peak GPU memory) follow each dataset's metrics.
Cells that never finished are shown as "—" and listed under the table, never silently dropped. A model run with
``score_fusion`` gets a derived row "<model> + SASRec fusion" right after its own (:func:`fusion_records`).
The validation table (:attr:`Leaderboard.validation`) has the same rows and the mean over seeds of each
run's ``best_valid_result`` (a fusion row: its fused validation results).

:class:`Leaderboard` keeps the numbers; :func:`display_table` lays them out for one output style;
:mod:`~recbole_ilora.leaderboard.exports` writes the files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from recbole_ilora.leaderboard.significance import paired_test, pool_pairs
from recbole_ilora.leaderboard.spec import (
    GridSpec,
    metric_key,
    metric_label,
    select_records,
)
from recbole_ilora.leaderboard.store import record_key
from recbole_ilora.utils import is_plugin_model

FUSION_SUFFIX = " + SASRec fusion"  # the derived row of a model run with score_fusion
BEST_CLASSICAL = "best classical"  # the improvement row against the best classical model of each column
DECIMALS = 4
COST_COLUMNS = {
    "num_trainable_parameters": "Params",
    "train_time_s": "Train (s)",
    "eval_time_s": "Test (s)",
    "peak_memory_gib": "Peak mem (GiB)",
}
STYLES = ("markdown", "latex", "plain")


@dataclass
class Leaderboard:
    """Aggregated leaderboard numbers as tidy DataFrames (see :func:`build_leaderboard`)."""

    models: list[str]
    datasets: list[str]
    metrics: list[str]  # display labels, e.g. "HR@1"
    seeds: list[int]
    test: str
    summary: pd.DataFrame  # model, dataset, metric, mean, std, n_seeds, seeds
    costs: pd.DataFrame  # model, dataset, num_trainable_parameters, train_time_s, eval_time_s, peak_memory_gib, device
    significance: pd.DataFrame  # dataset, metric, model, test, pooling, statistic, p_value, n_users, n_nonzero, marker, note
    improvements: pd.DataFrame  # dataset, metric, reference, reference_model, proposed_mean, reference_mean, relative_pct, marker
    missing: pd.DataFrame  # model, dataset, seed, status, error
    protocols: list[dict]
    proposed: str  # tested against every other model; the improvement rows are its
    baseline: str | None  # the proposed model's own baseline (an improvement row), if the grid names one
    llm_models: list[str]  # the grid's LLM-based (plugin) models; the others are classical
    tuning: pd.DataFrame = None  # model, dataset, <tuned settings>, valid_score, n_seeds, chosen (grids with `tune`)
    tuning_seeds: list[int] | None = None
    validation: pd.DataFrame = None  # model, dataset, metric, mean, std, n_seeds, seeds of best_valid_result
    variants: dict = None  # row -> {model, overrides}: the rows that run a registered model with other settings
    curves: pd.DataFrame = None  # model, dataset, epoch, optimizer_steps, metric, mean, std, n_seeds (learning_curve runs)

    @property
    def has_curves(self) -> bool:
        """Whether some run recorded a learning curve (the curve exports are written then only)."""
        return self.curves is not None and not self.curves.empty

    def mean(self, model: str, dataset: str, metric: str) -> float:
        row = self.summary[(self.summary.model == model) & (self.summary.dataset == dataset) & (self.summary.metric == metric)]
        return float(row["mean"].iloc[0]) if len(row) else math.nan


def build_leaderboard(spec: GridSpec, records: list[dict], cli_overrides=None, config_files=None) -> Leaderboard:
    """Aggregate the ``ok`` records of ``spec``'s cells (other configurations in ``records`` are ignored)."""
    selected, missing_cells = select_records(spec, records, cli_overrides, config_files)
    fused = fusion_records(selected)
    selected = selected + fused
    models = with_fusion_rows(spec.models, {record["model"] for record in fused})
    metric_keys = {metric_label(metric_key(name)): metric_key(name) for name in spec.metrics}
    board = Leaderboard(
        models=models,
        datasets=list(spec.datasets),
        metrics=list(metric_keys),
        seeds=list(spec.seeds),
        test=spec.significance_test,
        summary=_summary(selected, metric_keys),
        costs=_costs(selected),
        significance=pd.DataFrame(),
        improvements=pd.DataFrame(),
        missing=_missing(missing_cells, records),
        protocols=_distinct([record.get("protocol") for record in selected]),
        proposed=spec.proposed,
        baseline=spec.baseline,
        llm_models=[model for model in models if is_plugin_model(spec.base_model(model.removesuffix(FUSION_SUFFIX)))],
        tuning=_tuning(spec.choose(records, cli_overrides, config_files).trials),
        tuning_seeds=spec.tune.seeds if spec.tune else None,
        validation=_summary(selected, metric_keys, result="best_valid_result"),
        variants=dict(spec.variants),
        curves=_learning_curves(selected, metric_keys),
    )
    board.significance = _significance(board, selected, metric_keys)
    board.improvements = _improvements(board)
    return board


def fusion_records(records: list[dict]) -> list[dict]:
    """A derived record "<model> + SASRec fusion" for every record that carries a ``score_fusion`` section: its fused
    test results and per-user vectors, the same training and cost but the fusion's own evaluation time."""
    derived = []
    for record in records:
        fusion = record.get("score_fusion")
        if fusion:
            derived.append({**record, "model": record["model"] + FUSION_SUFFIX, "test_result": fusion["test_result"],
                            "test_per_user": fusion["test_per_user"], "best_valid_result": fusion["best_valid_result"],
                            "eval_time_s": fusion["eval_time_s"], "score_fusion": None})
    return derived


def with_fusion_rows(models, fused_models: set[str]) -> list[str]:
    """The grid's models, each followed by its fusion row where some record has one."""
    rows = []
    for model in models:
        rows += [model] + ([model + FUSION_SUFFIX] if model + FUSION_SUFFIX in fused_models else [])
    return rows


def _summary(records: list[dict], metric_keys: dict[str, str], result: str = "test_result") -> pd.DataFrame:
    """Mean, std and seeds of every (model, dataset, metric) of ``result``: the test results (every metric
    required), or ``best_valid_result`` (a metric a run did not validate on is left out, shown as "—")."""
    rows = []
    for record in records:
        values = record.get(result) or {}
        for label, key in metric_keys.items():
            if key not in values:
                if result != "test_result":
                    continue
                raise KeyError(
                    f"{record['model']} on {record['dataset']} (seed {record['seed']}) has no test metric {key!r}; "
                    f"it has {sorted(values)}. Add the metric to RecBole's `metrics`/`topk`."
                )
            rows.append((record["model"], record["dataset"], record["seed"], label, values[key]))
    long = pd.DataFrame(rows, columns=["model", "dataset", "seed", "metric", "value"])
    summary = long.groupby(["model", "dataset", "metric"], sort=False).agg(
        mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"), seeds=("seed", lambda s: sorted(s))
    )
    return summary.reset_index()


CURVE_METRICS = ("HR@1", "NDCG@5")  # the learning curves' metrics, where the grid reports them


def curve_metrics(metric_keys) -> list[str]:
    """The metrics of the learning curves: HR@1 and NDCG@5 of the grid's, else its first two."""
    labels = list(metric_keys)
    return [label for label in labels if label in CURVE_METRICS] or labels[:2]


def _learning_curves(records: list[dict], metric_keys: dict[str, str]) -> pd.DataFrame:
    """Test metrics (:func:`curve_metrics`) after every validation of the runs with ``learning_curve`` (for the report
    only: model selection stays on validation): mean and std over seeds per (model, dataset, epoch, metric), in the
    grid's row order. A fusion row has none: its weight is chosen once, after training."""
    columns = ["model", "dataset", "epoch", "optimizer_steps", "metric", "mean", "std", "n_seeds"]
    keys = {label: metric_keys[label] for label in curve_metrics(metric_keys)}
    rows = [(record["model"], record["dataset"], record["seed"], point["epoch"], point.get("optimizer_steps"), label,
             point["test_result"][key])
            for record in records if not record["model"].endswith(FUSION_SUFFIX)
            for point in record.get("learning_curve") or ()
            for label, key in keys.items() if key in (point.get("test_result") or {})]
    if not rows:
        return pd.DataFrame(columns=columns)
    long = pd.DataFrame(rows, columns=["model", "dataset", "seed", "epoch", "optimizer_steps", "metric", "value"])
    curves = long.groupby(["model", "dataset", "epoch", "metric"], sort=False).agg(
        optimizer_steps=("optimizer_steps", "max"), mean=("value", "mean"), std=("value", "std"),
        n_seeds=("seed", "nunique"))
    return curves.reset_index()[columns]


def _costs(records: list[dict]) -> pd.DataFrame:
    columns = ["model", "dataset", *COST_COLUMNS, "device"]
    frame = pd.DataFrame([{column: record.get(column) for column in columns} for record in records], columns=columns)
    numeric = list(COST_COLUMNS)
    frame[numeric] = frame[numeric].astype(float)
    return (
        frame.groupby(["model", "dataset"], sort=False)
        .agg({**{column: "mean" for column in numeric}, "device": lambda d: ", ".join(sorted(set(d)))})
        .reset_index()
    )


def _missing(missing_cells, records: list[dict]) -> pd.DataFrame:
    last_failure = {record_key(r): r for r in records if r.get("status") == "failed"}
    rows = []
    for cell in missing_cells:
        failure = last_failure.get(cell.key)
        rows.append(
            {
                "model": cell.model,
                "dataset": cell.dataset,
                "seed": cell.seed,
                "status": "awaiting tuning" if cell.awaiting_tuning else "failed" if failure else "not run",
                "error": failure["error"] if failure else "",
            }
        )
    return pd.DataFrame(rows, columns=["model", "dataset", "seed", "status", "error"])


def _tuning(trials: list[dict]) -> pd.DataFrame:
    """Every trial as a row: model, dataset, the tuned settings (None where a model does not tune one), scores."""
    scores = ["valid_score", "n_seeds", "chosen"]
    settings = list(dict.fromkeys(key for trial in trials for key in trial if key not in ("model", "dataset", *scores)))
    frame = pd.DataFrame(trials, columns=["model", "dataset", *scores])
    # object columns keep each value as written (a batch size stays 256, not 256.0 beside a missing one)
    values = pd.DataFrame([[trial.get(key) for key in settings] for trial in trials], columns=settings, dtype=object)
    return pd.concat([frame[["model", "dataset"]], values, frame[scores]], axis=1)


def _distinct(items: list) -> list:
    seen = {}
    for item in items:
        if item is not None:
            seen.setdefault(json.dumps(item, sort_keys=True, default=repr), item)
    return list(seen.values())


def _significance(board: Leaderboard, records: list[dict], metric_keys: dict[str, str]) -> pd.DataFrame:
    """Paired test of the proposed model against every other model, per dataset and metric (empty without it)."""
    columns = ["dataset", "metric", "model", "test", "pooling", "statistic", "p_value", "n_users", "n_nonzero", "marker", "note"]
    vectors: dict[tuple, dict[int, list]] = {}
    for record in records:
        vectors.setdefault((record["model"], record["dataset"]), {})[record["seed"]] = record["test_per_user"]
    rows = []
    for dataset in board.datasets:
        proposed = vectors.get((board.proposed, dataset))
        if proposed is None:
            continue
        for model in board.models:
            baseline = vectors.get((model, dataset))
            if model == board.proposed or baseline is None:
                continue
            for label, key in metric_keys.items():
                x, y, pooling = pool_pairs(
                    {seed: per_user[key] for seed, per_user in proposed.items()},
                    {seed: per_user[key] for seed, per_user in baseline.items()},
                )
                result = paired_test(x, y, method=board.test)
                rows.append(
                    [dataset, label, model, board.test, pooling, result.statistic, result.p_value,
                     result.n_pairs, result.n_nonzero, result.marker, result.note]
                )
    return pd.DataFrame(rows, columns=columns)


def _improvements(board: Leaderboard) -> pd.DataFrame:
    """The proposed model's relative improvement over the baseline and over the best classical model, per column.

    The classical candidates are the grid's models other than the proposed one that are not LLM-based.
    """
    columns = ["dataset", "metric", "reference", "reference_model", "proposed_mean", "reference_mean", "relative_pct", "marker"]
    rows = []
    summary = board.summary
    for dataset in board.datasets:
        for metric in board.metrics:
            proposed = board.mean(board.proposed, dataset, metric)
            if math.isnan(proposed):
                continue
            column = summary[(summary.dataset == dataset) & (summary.metric == metric)]
            classical = column[~column.model.isin([*board.llm_models, board.proposed])]
            references = []
            if board.baseline in set(column.model):
                references.append((board.baseline, board.baseline))
            if len(classical):
                references.append((BEST_CLASSICAL, classical.loc[classical["mean"].idxmax(), "model"]))
            for reference, model in references:
                reference_mean = board.mean(model, dataset, metric)
                relative = (proposed - reference_mean) / reference_mean * 100 if reference_mean else math.nan
                rows.append([dataset, metric, reference, model, proposed, reference_mean, relative,
                             _marker(board, dataset, metric, model)])
    return pd.DataFrame(rows, columns=columns)


def _marker(board: Leaderboard, dataset: str, metric: str, model: str) -> str:
    if board.significance.empty:
        return ""
    sig = board.significance
    row = sig[(sig.dataset == dataset) & (sig.metric == metric) & (sig.model == model)]
    return str(row["marker"].iloc[0]) if len(row) else ""


# ----------------------------------------------------------------------------------------------------
# Layout


def display_table(board: Leaderboard, style: str = "markdown") -> pd.DataFrame:
    """The table as strings, with (dataset, column) MultiIndex columns and models (+ improvement rows) as rows."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    columns = pd.MultiIndex.from_tuples(
        [(dataset, column) for dataset in board.datasets for column in [*board.metrics, *COST_COLUMNS.values()]],
        names=["Dataset", ""],
    )
    table = pd.DataFrame("", index=pd.Index(board.models, name="Model"), columns=columns)
    for dataset in board.datasets:
        for metric in board.metrics:
            _fill_metric_column(board, table, dataset, metric, style)
        _fill_cost_columns(board, table, dataset)
    for reference in (board.baseline, BEST_CLASSICAL):
        if reference is None or board.improvements.empty:
            continue
        rows = board.improvements[board.improvements.reference == reference]
        if rows.empty:
            continue
        label = f"{board.proposed} vs {reference}"
        table.loc[label] = ""
        for row in rows.itertuples():
            text = "n/a" if math.isnan(row.relative_pct) else f"{row.relative_pct:+.1f}%"
            if style == "latex":
                text = text.replace("%", "\\%")
            if reference == BEST_CLASSICAL:
                text += f" ({row.reference_model})"
            table.loc[label, (row.dataset, row.metric)] = text + _style_marker(row.marker, style)
    return table


def validation_table(board: Leaderboard, style: str = "markdown") -> pd.DataFrame:
    """The validation results as strings: the test table's rows and metric columns, mean ± std over seeds
    (no marks: nothing is tested or ranked on validation here), "—" where no run validated on a metric."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    columns = pd.MultiIndex.from_tuples([(dataset, metric) for dataset in board.datasets for metric in board.metrics],
                                        names=["Dataset", ""])
    table = pd.DataFrame("—", index=pd.Index(board.models, name="Model"), columns=columns)
    plus_minus = "$\\pm$" if style == "latex" else "±"
    for row in board.validation.itertuples():
        if row.model not in table.index:
            continue
        text = f"{row.mean:.{DECIMALS}f}"
        if row.n_seeds > 1:
            text += f" {plus_minus} {row.std:.{DECIMALS}f}"
        if row.n_seeds < len(board.seeds):
            text += f" (n={row.n_seeds})"
        table.loc[row.model, (row.dataset, row.metric)] = text
    return table


def _fill_metric_column(board: Leaderboard, table: pd.DataFrame, dataset: str, metric: str, style: str) -> None:
    summary = board.summary[(board.summary.dataset == dataset) & (board.summary.metric == metric)].set_index("model")
    rounded = summary["mean"].round(DECIMALS)
    best = rounded.max() if len(rounded) else math.nan
    below = rounded[rounded < best]
    second = below.max() if len(below) else math.nan
    for model in board.models:
        if model not in summary.index:
            table.loc[model, (dataset, metric)] = "—"
            continue
        row = summary.loc[model]
        text = f"{row['mean']:.{DECIMALS}f}"
        if row["n_seeds"] > 1:
            plus_minus = "$\\pm$" if style == "latex" else "±"
            text += f" {plus_minus} {row['std']:.{DECIMALS}f}"
        if rounded[model] == best:
            text = _emphasis(text, "bold", style)
        elif rounded[model] == second:
            text = _emphasis(text, "underline", style)
        if row["n_seeds"] < len(board.seeds):
            text += f" (n={row['n_seeds']})"
        marker = "" if model == board.proposed else _marker(board, dataset, metric, model)
        table.loc[model, (dataset, metric)] = text + _style_marker(marker, style)


def _emphasis(text: str, kind: str, style: str) -> str:
    if style == "markdown":
        return f"**{text}**" if kind == "bold" else f"<u>{text}</u>"
    if style == "latex":
        return f"\\textbf{{{text}}}" if kind == "bold" else f"\\underline{{{text}}}"
    return text


def _style_marker(marker: str, style: str) -> str:
    if style == "latex" and marker:
        return {"†": "$^\\dagger$", "‡": "$^\\ddagger$"}[marker]
    return marker


def _fill_cost_columns(board: Leaderboard, table: pd.DataFrame, dataset: str) -> None:
    costs = board.costs[board.costs.dataset == dataset].set_index("model")
    for model in board.models:
        if model not in costs.index:
            for label in COST_COLUMNS.values():
                table.loc[model, (dataset, label)] = "—"
            continue
        row = costs.loc[model]
        table.loc[model, (dataset, COST_COLUMNS["num_trainable_parameters"])] = f"{row.num_trainable_parameters:,.0f}"
        table.loc[model, (dataset, COST_COLUMNS["train_time_s"])] = f"{row.train_time_s:.1f}"
        table.loc[model, (dataset, COST_COLUMNS["eval_time_s"])] = f"{row.eval_time_s:.1f}"
        peak = row.peak_memory_gib
        table.loc[model, (dataset, COST_COLUMNS["peak_memory_gib"])] = "n/a" if pd.isna(peak) else f"{peak:.2f}"


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``("ml-100k", "HR@1")`` column labels -> ``"ml-100k HR@1"`` (for Markdown and CSV)."""
    flat = table.copy()
    flat.columns = [f"{dataset} {column}" for dataset, column in table.columns]
    return flat
