"""The leaderboard's files: Markdown, CSV, LaTeX and JSON tables with their caption, and the PNG plot.

:func:`export_leaderboard` builds the :class:`~recbole_ilora.leaderboard.tables.Leaderboard` of a grid's
results file and writes ``leaderboard.{md,csv,tex,json,png}``; the Markdown file also lists the runs
without a result and every tuning trial with its validation score. ``validation.{md,csv}`` beside them
hold the same rows' validation results (mean over seeds of ``best_valid_result``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from recbole_ilora.leaderboard.plot import plot_leaderboard, plot_learning_curves
from recbole_ilora.leaderboard.spec import GridSpec
from recbole_ilora.leaderboard.store import ResultsStore
from recbole_ilora.leaderboard.tables import (
    BEST_CLASSICAL,
    DECIMALS,
    Leaderboard,
    build_leaderboard,
    display_table,
    flat_columns,
    validation_table,
)

TEST_NAMES = {"wilcoxon": "two-sided Wilcoxon signed-rank test", "ttest": "two-sided paired t-test"}


def export_leaderboard(
    spec: GridSpec,
    store: ResultsStore,
    output_dir: str | os.PathLike | None = None,
    cli_overrides: dict | None = None,
    config_files=None,
) -> dict[str, Path]:
    """Write the tables (md, csv, tex, json) and the plot (png) of ``spec``'s results in ``store``."""
    records = store.load()
    board = build_leaderboard(spec, records, cli_overrides, config_files)
    if board.summary.empty:
        other = len([r for r in records if r.get("status") == "ok"])
        raise RuntimeError(
            f"No finished run of this grid in {store.path} ({other} ok records of other configurations there). "
            "Run the grid first, or pass the same --key=value overrides and --config_files it was run with."
        )
    output_dir = Path(output_dir or spec.results_dir(cli_overrides))
    paths = export_tables(board, output_dir)
    paths["png"] = plot_leaderboard(board, output_dir / "leaderboard.png")
    if board.has_curves:  # runs with learning_curve: true
        paths["curves_png"] = plot_learning_curves(board, output_dir / "learning_curves.png")
    print("Leaderboard written:\n" + "\n".join(f"  {fmt:8s} {path}" for fmt, path in paths.items()))
    return paths


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
        parts.append(f"No significance test and no improvement rows: {board.proposed} has no results in this grid.")
    else:
        poolings = sorted(set(board.significance.pooling))
        parts.append(
            f"{dagger} / {ddagger}: {board.proposed} differs from that model with p < 0.05 / p < 0.01, "
            f"{TEST_NAMES[board.test]} over test users on per-user metric values "
            f"{' or '.join(_POOLING_TEXT[p] for p in poolings)}"
            + ("; users with zero difference are dropped and all-zero differences give p = 1" if board.test == "wilcoxon"
               else "; all-zero differences give p = 1")
            + "; no multiple-comparison correction."
        )
        if not board.improvements.empty:
            references = set(board.improvements.reference)
            named = [board.baseline] if board.baseline in references else []
            if BEST_CLASSICAL in references:
                named.append("the best classical (RecBole) baseline of the column")
            parts.append(f"Improvement rows: ({board.proposed} - X) / X of the means, X = {' or '.join(named)}, "
                         "with the same significance mark.")
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
    settings = [column for column in table.columns if column not in ("model", "dataset", "valid_score", "n_seeds", "chosen")]
    gaps = bool(table[settings].isna().any().any())  # per-model spaces: settings only other models tune
    table[settings] = table[settings].astype(object).where(table[settings].notna(), "—")
    table["valid_score"] = table["valid_score"].map(lambda v: "—" if math.isnan(v) else f"{v:.{DECIMALS}f}")
    table["chosen"] = table["chosen"].map({True: "✓", False: ""})
    seeds = ", ".join(map(str, board.tuning_seeds or []))
    return (f"**Tuning.** Validation score (the run's valid_metric at its early-stopping checkpoint, mean over "
            f"seed(s) {seeds}) of every trial; ✓ = the settings every seed of that model and dataset then used"
            f"{'; — = a setting that model does not tune' if gaps else ''}. "
            f"Test results took no part in the choice.\n\n" + table.to_markdown(index=False, disable_numparse=True) + "\n")


def to_markdown(board: Leaderboard) -> str:
    table = flat_columns(display_table(board, "markdown")).to_markdown(disable_numparse=True)
    text = f"**Table.** {caption(board, 'plain')}\n\n{table}\n"
    missing = missing_text(board)
    tuning = tuning_text(board)
    return text + (f"\n{missing}\n" if missing else "") + (f"\n{tuning}" if tuning else "")


def validation_markdown(board: Leaderboard) -> str:
    """The validation table in Markdown, with its caption."""
    table = flat_columns(validation_table(board, "markdown")).to_markdown(disable_numparse=True)
    tuned = " Tuned models chose their settings on validation, so their numbers here are optimistic." \
        if board.tuning is not None and not board.tuning.empty else ""
    text = (f"**Validation.** {', '.join(board.metrics)} on the validation split at each run's early-stopping "
            f"checkpoint (best_valid_result): mean ± sample standard deviation over {len(board.seeds)} seeds "
            f"({', '.join(map(str, board.seeds))}); a fusion row: the fused scores at its chosen weight; "
            f"n=k marks a mean over fewer seeds, — a metric without validation results.{tuned}\n\n{table}\n")
    return text


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
                 "metrics": board.metrics, "significance_test": board.test, "proposed": board.proposed,
                 "baseline": board.baseline, "variants": board.variants or {}},
        "protocols": board.protocols,
        "results": records(board.summary),
        "costs": records(board.costs),
        "significance": records(board.significance),
        "improvements": records(board.improvements),
        "missing": records(board.missing),
        "tuning": records(board.tuning) if board.tuning is not None else [],
        "validation": records(board.validation) if board.validation is not None else [],
        "learning_curves": records(board.curves) if board.curves is not None else [],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def export_tables(board: Leaderboard, output_dir: str | Path) -> dict[str, Path]:
    """Write ``leaderboard.{md,csv,tex,json}`` and ``validation.{md,csv}`` into ``output_dir`` and return their
    paths by format (``validation_markdown``, ``validation_csv`` for the validation table)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: output_dir / f"leaderboard.{ext}" for fmt, ext in
             (("markdown", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json"))}
    paths["validation_markdown"] = output_dir / "validation.md"
    paths["validation_csv"] = output_dir / "validation.csv"
    paths["markdown"].write_text(to_markdown(board), encoding="utf-8")
    flat_columns(display_table(board, "plain")).to_csv(paths["csv"], encoding="utf-8")
    paths["latex"].write_text(to_latex(board), encoding="utf-8")
    paths["json"].write_text(to_json(board), encoding="utf-8")
    paths["validation_markdown"].write_text(validation_markdown(board), encoding="utf-8")
    flat_columns(validation_table(board, "plain")).to_csv(paths["validation_csv"], encoding="utf-8")
    if board.has_curves:
        paths["curves_markdown"] = output_dir / "learning_curves.md"
        paths["curves_csv"] = output_dir / "learning_curves.csv"
        paths["curves_markdown"].write_text(learning_curves_markdown(board), encoding="utf-8")
        board.curves.to_csv(paths["curves_csv"], index=False, encoding="utf-8")
    return paths


def learning_curves_markdown(board: Leaderboard) -> str:
    """One row per (dataset, epoch), one column per (model, metric): mean ± std over seeds of the test metrics after
    each epoch's validation."""
    curves = board.curves
    cells = curves.assign(value=[_mean_std(row.mean, row.std, row.n_seeds) for row in curves.itertuples()])
    models = [model for model in board.models if model in set(curves.model)]
    metrics = [metric for metric in board.metrics if metric in set(curves.metric)]
    table = cells.pivot_table(index=["dataset", "epoch"], columns=["model", "metric"], values="value", aggfunc="first",
                              sort=False).reindex(columns=pd.MultiIndex.from_product([models, metrics]))
    table = table.reindex([(d, e) for d in board.datasets for e in sorted(set(curves.epoch)) if (d, e) in table.index])
    table.columns = [f"{model} {metric}" for model, metric in table.columns]
    table.index = [f"{dataset}, epoch {epoch}" for dataset, epoch in table.index]
    seeds = ", ".join(map(str, board.seeds))
    text = (f"**Learning curves.** Test {', '.join(metrics)} after each epoch (the run's validation at that epoch; "
            f"model selection stays on validation): mean ± sample standard deviation over the seeds ({seeds}) that "
            f"recorded a curve (fusion rows have none: their weight is chosen once, after training).\n\n"
            f"{table.fillna('—').to_markdown(disable_numparse=True)}\n")
    return text


def _mean_std(mean: float, std: float, n_seeds: int) -> str:
    return f"{mean:.4f}" if n_seeds < 2 or pd.isna(std) else f"{mean:.4f} ± {std:.4f}"
