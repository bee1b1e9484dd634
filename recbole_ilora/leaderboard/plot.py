"""The leaderboard as a PNG: one panel per dataset, grouped bars of each metric per model, std error bars.

Drawn on matplotlib's Agg canvas through :class:`matplotlib.figure.Figure` (no pyplot, no display and
no global figure state), so it works on headless machines and inside tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recbole_ilora.leaderboard.tables import Leaderboard


def plot_leaderboard(board: Leaderboard, path: str | Path) -> Path:
    """Save the bar chart of ``board`` to ``path`` (PNG) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_datasets = len(board.datasets)
    figure = Figure(figsize=(max(6.0, 1.2 * len(board.metrics) * max(1, len(board.models)) / 3) * n_datasets, 4.8),
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_datasets, squeeze=False)[0]
    colors = _model_colors(board.models)
    width = 0.8 / max(1, len(board.models))
    positions = np.arange(len(board.metrics))
    for axis, dataset in zip(axes, board.datasets):
        summary = board.summary[board.summary.dataset == dataset]
        for index, model in enumerate(board.models):
            rows = summary[summary.model == model].set_index("metric").reindex(board.metrics)
            if rows["mean"].isna().all():
                continue  # no finished run of this model on this dataset (listed under the table)
            axis.bar(
                positions + (index - (len(board.models) - 1) / 2) * width,
                rows["mean"].to_numpy(dtype=float),
                width,
                yerr=rows["std"].fillna(0).to_numpy(dtype=float),
                capsize=2,
                label=_legend_label(board, model),
                color=colors[model],
                edgecolor="black" if model in board.llm_models else "none",
                linewidth=0.6,
            )
        axis.set_xticks(positions, board.metrics)
        axis.set_xlabel("test metric")
        axis.set_ylabel(f"score (mean ± std over {len(board.seeds)} seeds)")
        axis.set_title(dataset)
        axis.set_ylim(bottom=0)
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    for axis in axes[1:]:  # models missing from the first dataset still get a legend entry
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="outside right center", title="model\n(outlined: LLM-based)")
    figure.suptitle(_subtitle(board), fontsize="medium")
    figure.savefig(path, dpi=150)
    return path


def plot_learning_curves(board: Leaderboard, path: str | Path) -> Path:
    """Save the learning curves of ``board`` (test metrics after every epoch; one panel per dataset and metric, a line
    per model, mean ± std over seeds shaded) to ``path`` (PNG) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    curves = board.curves
    datasets = [dataset for dataset in board.datasets if dataset in set(curves.dataset)]
    metrics = [metric for metric in board.metrics if metric in set(curves.metric)]
    figure = Figure(figsize=(3.6 * len(metrics) + 2.4, 3.0 * len(datasets)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(datasets), len(metrics), squeeze=False)
    colors = _model_colors(board.models)
    for row, dataset in enumerate(datasets):
        for column, metric in enumerate(metrics):
            axis = axes[row][column]
            for model in board.models:
                line = curves[(curves.model == model) & (curves.dataset == dataset) & (curves.metric == metric)]
                if line.empty:
                    continue
                line = line.sort_values("epoch")
                epochs, mean = line["epoch"].to_numpy(dtype=float), line["mean"].to_numpy(dtype=float)
                spread = line["std"].fillna(0).to_numpy(dtype=float)
                axis.plot(epochs, mean, marker="o", color=colors[model], label=_legend_label(board, model))
                axis.fill_between(epochs, mean - spread, mean + spread, color=colors[model], alpha=0.15, linewidth=0)
            axis.set_title(f"{dataset}: test {metric}")
            axis.set_xlabel("epoch")
            axis.set_xticks(sorted(set(curves.epoch)))  # whole epochs
            axis.grid(alpha=0.3)
    handles, labels = [], []
    for axis in axes.flat:  # every model that has a curve somewhere gets one legend entry
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="outside right center", title="model")
    figure.suptitle("Learning curves (test metrics after each epoch; mean ± std over seeds)", fontsize="medium")
    figure.savefig(path, dpi=150)
    return path


def _legend_label(board: Leaderboard, model: str) -> str:
    """The model's name, with its seed count when some of its runs have no result."""
    seeds = board.summary[board.summary.model == model]["n_seeds"]
    fewest = int(seeds.min()) if len(seeds) else 0
    return model if fewest >= len(board.seeds) else f"{model} (n={fewest} seed{'s' if fewest != 1 else ''})"


def _model_colors(models: list[str]) -> dict:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {model: palette[index % len(palette)] for index, model in enumerate(models)}


def _subtitle(board: Leaderboard) -> str:
    modes = sorted({str(protocol.get("test_mode")) for protocol in board.protocols}) or ["unknown"]
    return f"Leaderboard: test {', '.join(board.metrics)} ({'/'.join(modes)} protocol), seeds {', '.join(map(str, board.seeds))}"
