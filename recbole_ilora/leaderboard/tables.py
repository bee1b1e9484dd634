"""The leaderboard table: per-seed records aggregated with pandas and exported as Markdown, CSV, LaTeX, JSON.

Rows are models (in grid order), columns are dataset x metric, and each cell is the mean ± sample
standard deviation (ddof=1) over seeds. In every metric column the best mean is bold and the second
best underlined (ties share the mark; compared at the 4 printed decimals). If iLoRA has results, each
other model's cell carries † (p < 0.05) or ‡ (p < 0.01) when a paired test over test users
(:mod:`recbole_ilora.leaderboard.significance`) finds iLoRA different from it, and two extra rows give
iLoRA's relative improvement over LLaRA and over the best classical (RecBole) baseline of that column.
Cost columns (trainable parameters, training and test wall time, peak GPU memory) follow each dataset's
metrics. Cells that never finished are shown as "—" and listed under the table, never silently dropped.

:class:`Leaderboard` keeps the numbers as tidy DataFrames; :func:`display_table` renders them for one
output style and :func:`export_tables` writes the four files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recbole_ilora.leaderboard.grid import (
    GridSpec,
    metric_key,
    metric_label,
    select_records,
)
from recbole_ilora.leaderboard.significance import paired_test, pool_pairs

PROPOSED_MODEL = "iLoRA"
LLM_BASELINE = "LLaRA"
LLM_MODELS = frozenset({"iLoRA", "LLaRA", "TALLRec"})  # the plugin's models; every other model is "classical"
DECIMALS = 4
COST_COLUMNS = {
    "num_trainable_parameters": "Params",
    "train_time_s": "Train (s)",
    "eval_time_s": "Test (s)",
    "peak_memory_gib": "Peak mem (GiB)",
}
TEST_NAMES = {"wilcoxon": "two-sided Wilcoxon signed-rank test", "ttest": "two-sided paired t-test"}
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
    tuning: pd.DataFrame = None  # model, dataset, <tuned settings>, valid_score, n_seeds, chosen (grids with `tune`)
    tuning_seeds: list[int] | None = None

    def mean(self, model: str, dataset: str, metric: str) -> float:
        row = self.summary[(self.summary.model == model) & (self.summary.dataset == dataset) & (self.summary.metric == metric)]
        return float(row["mean"].iloc[0]) if len(row) else math.nan


def build_leaderboard(spec: GridSpec, records: list[dict], cli_overrides=None, config_files=None) -> Leaderboard:
    """Aggregate the ``ok`` records of ``spec``'s cells (other configurations in ``records`` are ignored)."""
    selected, missing_cells = select_records(spec, records, cli_overrides, config_files)
    metric_keys = {metric_label(metric_key(name)): metric_key(name) for name in spec.metrics}
    board = Leaderboard(
        models=list(spec.models),
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
        tuning=pd.DataFrame(spec.choose(records, cli_overrides, config_files).trials) if spec.tune else pd.DataFrame(),
        tuning_seeds=spec.tune["seeds"] if spec.tune else None,
    )
    board.significance = _significance(board, selected, metric_keys)
    board.improvements = _improvements(board)
    return board


def _summary(records: list[dict], metric_keys: dict[str, str]) -> pd.DataFrame:
    rows = []
    for record in records:
        for label, key in metric_keys.items():
            if key not in record["test_result"]:
                raise KeyError(
                    f"{record['model']} on {record['dataset']} (seed {record['seed']}) has no test metric {key!r}; "
                    f"it has {sorted(record['test_result'])}. Add the metric to RecBole's `metrics`/`topk`."
                )
            rows.append((record["model"], record["dataset"], record["seed"], label, record["test_result"][key]))
    long = pd.DataFrame(rows, columns=["model", "dataset", "seed", "metric", "value"])
    summary = long.groupby(["model", "dataset", "metric"], sort=False).agg(
        mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"), seeds=("seed", lambda s: sorted(s))
    )
    return summary.reset_index()


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
    last_failure = {
        (r["model"], r["dataset"], r["seed"], r["config_hash"]): r for r in records if r.get("status") == "failed"
    }
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


def _distinct(items: list) -> list:
    seen = {}
    for item in items:
        if item is not None:
            seen.setdefault(json.dumps(item, sort_keys=True, default=repr), item)
    return list(seen.values())


def _significance(board: Leaderboard, records: list[dict], metric_keys: dict[str, str]) -> pd.DataFrame:
    """Paired test of iLoRA against every other model, per dataset and metric (empty without iLoRA)."""
    columns = ["dataset", "metric", "model", "test", "pooling", "statistic", "p_value", "n_users", "n_nonzero", "marker", "note"]
    vectors: dict[tuple, dict[int, list]] = {}
    for record in records:
        vectors.setdefault((record["model"], record["dataset"]), {})[record["seed"]] = record["test_per_user"]
    rows = []
    for dataset in board.datasets:
        proposed = vectors.get((PROPOSED_MODEL, dataset))
        if proposed is None:
            continue
        for model in board.models:
            baseline = vectors.get((model, dataset))
            if model == PROPOSED_MODEL or baseline is None:
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
    """iLoRA's relative improvement over LLaRA and over the best classical model, per column."""
    columns = ["dataset", "metric", "reference", "reference_model", "proposed_mean", "reference_mean", "relative_pct", "marker"]
    rows = []
    summary = board.summary
    for dataset in board.datasets:
        for metric in board.metrics:
            proposed = board.mean(PROPOSED_MODEL, dataset, metric)
            if math.isnan(proposed):
                continue
            column = summary[(summary.dataset == dataset) & (summary.metric == metric)]
            classical = column[~column.model.isin(LLM_MODELS)]
            references = []
            if LLM_BASELINE in set(column.model):
                references.append((LLM_BASELINE, LLM_BASELINE))
            if len(classical):
                references.append(("best classical", classical.loc[classical["mean"].idxmax(), "model"]))
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
# Rendering


def caption(board: Leaderboard, style: str = "plain") -> str:
    """The table caption: protocol, seeds, aggregation, marks, test and costs (no LaTeX escaping)."""
    pm, dagger, ddagger = ("$\\pm$", "$^\\dagger$", "$^\\ddagger$") if style == "latex" else ("±", "†", "‡")
    seeds = ", ".join(map(str, board.seeds))
    parts = [
        f"Test {', '.join(board.metrics)}: mean {pm} sample standard deviation over {len(board.seeds)} seeds ({seeds}).",
        _protocol_text(board.protocols),
        "Bold: best, underlined: second best model in each metric column.",
    ]
    if board.significance.empty:
        parts.append(f"No significance test and no improvement rows: {PROPOSED_MODEL} has no results in this grid.")
    else:
        poolings = sorted(set(board.significance.pooling))
        parts.append(
            f"{dagger} / {ddagger}: {PROPOSED_MODEL} differs from that model with p < 0.05 / p < 0.01, "
            f"{TEST_NAMES[board.test]} over test users on per-user metric values "
            f"{' or '.join(_POOLING_TEXT[p] for p in poolings)}"
            + ("; users with zero difference are dropped and all-zero differences give p = 1" if board.test == "wilcoxon"
               else "; all-zero differences give p = 1")
            + "; no multiple-comparison correction."
        )
        if not board.improvements.empty:
            parts.append(
                f"Improvement rows: ({PROPOSED_MODEL} - X) / X of the means, X = {LLM_BASELINE} or the best classical "
                f"(RecBole) baseline of the column, with the same significance mark."
            )
    devices = ", ".join(sorted(set(", ".join(board.costs.device).split(", ")))) if len(board.costs) else "none"
    parts.append(
        "Costs (mean over seeds): trainable parameters, training and test wall-clock seconds, peak GPU memory "
        f"(n/a on CPU); device: {devices}."
    )
    if len(board.missing):
        parts.append(f"{len(board.missing)} of {len(board.models) * len(board.datasets) * len(board.seeds)} runs "
                     "have no result (listed below the table); n=k marks a mean over fewer seeds.")
    return " ".join(parts)


_POOLING_TEXT = {
    "mean over seeds": "averaged per user over the seeds both models finished (the test users coincide across seeds)",
    "concatenated over seeds": "paired within each seed and concatenated over the seeds both models finished",
}


def _protocol_text(protocols: list[dict]) -> str:
    if not protocols:
        return "Protocol: unknown (no finished runs)."
    texts = [_describe_protocol(protocol) for protocol in protocols]
    if len(texts) == 1:
        return texts[0]
    return "WARNING: the runs used different protocols: " + " | ".join(texts)


def _describe_protocol(protocol: dict) -> str:
    split, order, mode = protocol.get("split"), protocol.get("order"), str(protocol.get("test_mode"))
    if split == {"LS": "valid_and_test"}:
        by = {"TO": "by time", "RO": "in random order"}.get(order, f"order {order}")
        split_text = f"leave-one-out split {by} (each user's last interaction tests, the second-to-last validates)"
    else:
        split_text = f"split {split} (order {order})"
    sampled = re.fullmatch(r"(uni|pop)(\d+)", mode)
    if sampled:
        kind = "uniformly" if sampled.group(1) == "uni" else "popularity-"
        mode_text = f"the target is ranked among itself and {sampled.group(2)} {kind} sampled negatives ({mode})"
    elif mode == "full":
        mode_text = "the target is ranked against all items (full ranking)"
    else:
        mode_text = f"test mode {mode}"
    return f"Protocol: {split_text}; {mode_text}; early stopping on validation {protocol.get('valid_metric')}."


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
    for reference, label in ((LLM_BASELINE, f"{PROPOSED_MODEL} vs {LLM_BASELINE}"),
                             ("best classical", f"{PROPOSED_MODEL} vs best classical")):
        rows = board.improvements[board.improvements.reference == reference] if len(board.improvements) else []
        if len(rows) == 0:
            continue
        table.loc[label] = ""
        for row in rows.itertuples():
            text = "n/a" if math.isnan(row.relative_pct) else f"{row.relative_pct:+.1f}%"
            if style == "latex":
                text = text.replace("%", "\\%")
            if reference == "best classical":
                text += f" ({row.reference_model})"
            table.loc[label, (row.dataset, row.metric)] = text + _style_marker(row.marker, style)
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
        marker = "" if model == PROPOSED_MODEL else _marker(board, dataset, metric, model)
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


def missing_text(board: Leaderboard) -> str:
    if board.missing.empty:
        return ""
    lines = [f"- {r.model} on {r.dataset}, seed {r.seed}: {r.status}" + (f" ({r.error})" if r.error else "")
             for r in board.missing.itertuples()]
    return "Runs without a result:\n" + "\n".join(lines)


def tuning_text(board: Leaderboard) -> str:
    """The validation-only tuning trials as a Markdown table (empty without ``tune``)."""
    if board.tuning is None or board.tuning.empty:
        return ""
    table = board.tuning.copy()
    table["valid_score"] = table["valid_score"].map(lambda v: "—" if math.isnan(v) else f"{v:.{DECIMALS}f}")
    table["chosen"] = table["chosen"].map({True: "✓", False: ""})
    seeds = ", ".join(map(str, board.tuning_seeds or []))
    return (f"**Tuning.** Validation score (the run's valid_metric at its early-stopping checkpoint, mean over "
            f"seed(s) {seeds}) of every trial; ✓ = the settings every seed of that model and dataset then used. "
            f"Test results took no part in the choice.\n\n" + table.to_markdown(index=False, disable_numparse=True) + "\n")


def to_markdown(board: Leaderboard) -> str:
    table = flat_columns(display_table(board, "markdown")).to_markdown(disable_numparse=True)
    text = f"**Table.** {caption(board, 'plain')}\n\n{table}\n"
    missing = missing_text(board)
    tuning = tuning_text(board)
    return text + (f"\n{missing}\n" if missing else "") + (f"\n{tuning}" if tuning else "")


def to_latex(board: Leaderboard) -> str:
    table = display_table(board, "latex")
    table.columns.names = [None, None]
    styler = table.style.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
    styler = styler.hide(axis="index", names=True)
    return styler.to_latex(
        caption=_escape_latex_text(caption(board, "latex")),
        label="tab:leaderboard",
        hrules=True,
        multicol_align="c",
        position_float="centering",
    )


def _escape_latex_text(text: str) -> str:
    # The caption's own math ($\pm$, $^\dagger$) is kept; characters LaTeX reserves in prose are escaped.
    return re.sub(r"(?<!\\)([%&#_])", r"\\\1", text).replace("<", "$<$")


def to_json(board: Leaderboard) -> str:
    """Every number behind the table (no formatting), one JSON document."""
    def records(frame: pd.DataFrame) -> list:
        return json.loads(frame.to_json(orient="records", double_precision=15)) if len(frame) else []

    document = {
        "caption": caption(board, "plain"),
        "grid": {"models": board.models, "datasets": board.datasets, "seeds": board.seeds,
                 "metrics": board.metrics, "significance_test": board.test},
        "protocols": board.protocols,
        "results": records(board.summary),
        "costs": records(board.costs),
        "significance": records(board.significance),
        "improvements": records(board.improvements),
        "missing": records(board.missing),
        "tuning": records(board.tuning) if board.tuning is not None else [],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def export_tables(board: Leaderboard, output_dir: str | Path) -> dict[str, Path]:
    """Write ``leaderboard.{md,csv,tex,json}`` into ``output_dir`` and return their paths by format."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: output_dir / f"leaderboard.{ext}" for fmt, ext in
             (("markdown", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json"))}
    paths["markdown"].write_text(to_markdown(board), encoding="utf-8")
    flat_columns(display_table(board, "plain")).to_csv(paths["csv"], encoding="utf-8")
    paths["latex"].write_text(to_latex(board), encoding="utf-8")
    paths["json"].write_text(to_json(board), encoding="utf-8")
    return paths


def parse_markdown_means(markdown: str) -> dict[tuple[str, str], float]:
    """Read the means back from :func:`to_markdown`'s table: ``{(model, "ml-100k HR@1"): mean}``.

    Only metric cells (``mean ± std``, possibly emphasised and marked) are returned; used by the tests to
    check that the Markdown table shows the numbers of the JSON export.
    """
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
    """``{(model, "dataset metric"): mean}`` from the numbers, in :func:`parse_markdown_means`' layout."""
    return {(row.model, f"{row.dataset} {row.metric}"): float(row.mean) for row in board.summary.itertuples()}


__all__ = [
    "Leaderboard",
    "build_leaderboard",
    "caption",
    "display_table",
    "export_tables",
    "parse_markdown_means",
    "numeric_means",
    "to_json",
    "to_latex",
    "to_markdown",
]
