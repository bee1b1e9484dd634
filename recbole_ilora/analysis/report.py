"""The analysis on disk: CSV tables, Markdown, heatmaps and bar charts, summary.json and summary.md.

Figures are drawn on matplotlib's Agg canvas through :class:`matplotlib.figure.Figure` (no pyplot, no
display), so they work on headless machines and inside tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recbole_ilora.utils import atomic_path

# Clusters with fewer users than this are flagged in summary.md: their per-cluster numbers are noisy.
SMALL_CLUSTER = 5


def cluster_names(num_clusters: int) -> list[str]:
    return [f"C{cluster}" for cluster in range(num_clusters)]


def plain(value):
    """JSON-ready copy: numpy scalars and arrays become Python numbers and lists; NaN and inf become None."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, table: pd.DataFrame, index: bool = True) -> Path:
    with atomic_path(path) as partial:
        table.to_csv(partial, index=index, float_format="%.6g")
    return path


def _save(figure: Figure, path: Path) -> Path:
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=150, format="png")
    return path


# ----------------------------------------------------------------------------------------- tables
def write_clusters(out: Path, user_tokens: np.ndarray, labels: np.ndarray, source: np.ndarray) -> Path:
    table = pd.DataFrame({"user_id": user_tokens, "cluster": labels, "assigned_from": source})
    return write_csv(out / "clusters.csv", table, index=False)


def similarity_table(matrix: np.ndarray) -> pd.DataFrame:
    names = cluster_names(len(matrix))
    return pd.DataFrame(matrix, index=pd.Index(names, name="cluster"), columns=names)


def write_similarity(out: Path, label: str, part: str, matrix: np.ndarray) -> Path:
    return write_csv(out / f"gradient_similarity_{label}_{part}.csv", similarity_table(matrix))


def gate_table(label: str, stats: dict, sizes: list[int]) -> pd.DataFrame:
    """One row per cluster: its users and each expert's mean ± std weight."""
    mean, std = np.asarray(stats["cluster_mean"]), np.asarray(stats["cluster_std"])
    table = pd.DataFrame({"model": label, "cluster": cluster_names(len(mean)), "users": sizes})
    for expert in range(mean.shape[1]):
        table[f"expert_{expert}_mean"] = mean[:, expert]
        table[f"expert_{expert}_std"] = std[:, expert]
    return table


def metrics_table(metrics: dict[str, dict], metric_names: tuple[str, ...]) -> pd.DataFrame:
    """Rows: clusters then ``all``; columns: test users, then each model's metrics (and the last minus the first)."""
    labels = list(metrics)
    first = metrics[labels[0]]
    names = cluster_names(len(first["users"])) + ["all"]
    table = pd.DataFrame({"cluster": names, "test_users": first["users"] + [sum(first["users"])]})
    for name in metric_names:
        for label in labels:
            table[f"{label} {name}"] = metrics[label]["clusters"][name] + [metrics[label]["overall"][name]]
        if len(labels) >= 2:
            table[f"{labels[-1]} - {labels[0]} {name}"] = (
                table[f"{labels[-1]} {name}"].astype(float) - table[f"{labels[0]} {name}"].astype(float)
            )
    return table


# ----------------------------------------------------------------------------------------- figures
def plot_similarities(path: Path, matrices: dict[str, dict[str, np.ndarray]]) -> Path:
    """One annotated heatmap per (model, part): rows are models, columns mixed then the experts."""
    columns = max(len(parts) for parts in matrices.values())
    num_clusters = len(next(iter(next(iter(matrices.values())).values())))
    size = max(3.2, 0.45 * num_clusters + 1.2)
    figure = Figure(figsize=(size * columns + 1.0, size * len(matrices)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(matrices), columns, squeeze=False)
    names = cluster_names(num_clusters)
    image = None
    for row, (label, parts) in enumerate(matrices.items()):
        for column in range(columns):
            axis = axes[row][column]
            if column >= len(parts):
                axis.set_axis_off()
                continue
            part, matrix = list(parts.items())[column]
            image = axis.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
            axis.set_xticks(range(num_clusters), names, fontsize="small")
            axis.set_yticks(range(num_clusters), names, fontsize="small")
            axis.set_title(f"{label}: {part}", fontsize="medium")
            if num_clusters <= 16:  # annotations stay readable up to 16 x 16
                for (i, j), value in np.ndenumerate(matrix):
                    axis.text(j, i, "nan" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                              fontsize="x-small", color="white" if abs(np.nan_to_num(value)) > 0.6 else "black")
    figure.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity of cluster gradients")
    figure.suptitle("Gradient cosine similarity between user clusters (LoRA parameters)")
    return _save(figure, path)


def plot_gate(path: Path, gates: dict[str, dict]) -> Path:
    """Grouped bars per model: clusters on the x axis, one bar per expert (mean weight, std as error bar)."""
    figure = Figure(figsize=(max(6.0, 1.0 * len(next(iter(gates.values()))["cluster_mean"]) + 2), 3.6 * len(gates)),
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(gates), 1, squeeze=False)[:, 0]
    for axis, (label, stats) in zip(axes, gates.items()):
        mean, std = np.asarray(stats["cluster_mean"]), np.asarray(stats["cluster_std"])
        num_clusters, num_experts = mean.shape
        width = 0.8 / num_experts
        positions = np.arange(num_clusters)
        for expert in range(num_experts):
            axis.bar(positions + (expert - (num_experts - 1) / 2) * width, mean[:, expert], width,
                     yerr=std[:, expert], capsize=2, label=f"expert {expert}")
        axis.axhline(1 / num_experts, color="grey", linestyle="--", linewidth=0.8, label="uniform 1/K")
        axis.set_xticks(positions, cluster_names(num_clusters))
        axis.set_ylim(0, 1)
        axis.set_ylabel("gate weight (mean ± std)")
        state = stats["verdict"].split(":")[0]
        axis.set_title(f"{label}: expert weights per user cluster ({state})", fontsize="medium")
        axis.legend(fontsize="small", ncols=min(num_experts + 1, 5))
    return _save(figure, path)


# ----------------------------------------------------------------------------------------- all files
def write_tables_and_figures(out: Path, similarities: dict, gates: dict, cluster_sizes: list[int], metrics: dict,
                             metric_names: tuple[str, ...]) -> tuple[list[Path], dict[str, pd.DataFrame]]:
    """Every CSV, Markdown table and figure of the analysis; returns the paths and the tables for summary.md."""
    files, tables = [], {"metrics": metrics_table(metrics, metric_names)}
    for label, parts in similarities.items():
        files += [write_similarity(out, label, part, matrix) for part, matrix in parts.items()]
    files.append(plot_similarities(out / "gradient_similarity.png", similarities))
    if gates:
        for label, stats in gates.items():
            tables[f"gate_{label}"] = gate_table(label, stats, cluster_sizes)
        gate_frame = pd.concat([tables[f"gate_{label}"] for label in gates], ignore_index=True)
        files.append(write_csv(out / "gate_weights.csv", gate_frame, index=False))
        files.append(write_text(out / "gate_weights.md", gate_frame.to_markdown(index=False, floatfmt=".3f") + "\n"))
        files.append(plot_gate(out / "gate_weights.png", gates))
    files.append(write_csv(out / "cluster_metrics.csv", tables["metrics"], index=False))
    metrics_markdown = tables["metrics"].to_markdown(index=False, floatfmt=".4f")
    files.append(write_text(out / "cluster_metrics.md", metrics_markdown + "\n"))
    return files, tables


def write_summary(out: Path, summary: dict, tables: dict[str, pd.DataFrame]) -> tuple[Path, Path]:
    """summary.json (everything, plain numbers) and summary.md (the findings in words and tables)."""
    json_path = write_text(out / "summary.json", json.dumps(plain(summary), indent=2) + "\n")
    return json_path, write_text(out / "summary.md", summary_markdown(summary, tables))


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_markdown(summary: dict, tables: dict[str, pd.DataFrame]) -> str:
    checkpoints = ", ".join(f"{item['label']} (`{item['path']}`)" for item in summary["checkpoints"])
    sections = [
        "# Gradient conflict and gate analysis (iLoRA, Kong et al., NeurIPS 2024)",
        f"Dataset `{summary['dataset']}`; checkpoints: {checkpoints}.",
        _clusters_section(summary["clustering"]),
        _gradients_section(summary),
        _gate_section(summary["gate"], tables),
        "## Test metrics per cluster\n\n" + tables["metrics"].to_markdown(index=False, floatfmt=".4f"),
    ]
    return "\n\n".join(sections) + "\n"


def _clusters_section(clustering: dict) -> str:
    method = (
        f"KMeans (k={clustering['num_clusters']}, random_state={clustering['seed']}, n_init={clustering['n_init']}) "
        f"on {clustering['source']}'s frozen SASRec representation of each user's last training sample: "
        f"{clustering['num_users']} users, cluster sizes {clustering['sizes']} (clusters.csv)."
    )
    lines = ["## User clusters", "", method, ""]
    for label, check in clustering["representation_check"].items():
        if check["same"]:
            lines.append(f"- {label}: the same representations as the clustering model.")
        else:
            lines.append(f"- {label}: DIFFERENT representations (max abs difference "
                         f"{check['max_abs_difference']:.3g}): its gate reads another SASRec than the one the "
                         "clusters come from.")
    small = [f"C{cluster}" for cluster, size in enumerate(clustering["sizes"]) if size < SMALL_CLUSTER]
    if small:
        lines.append(f"- {', '.join(small)} hold fewer than {SMALL_CLUSTER} users (outliers in representation space): "
                     "their rows in the tables below rest on few users.")
    missing = clustering["test_users_without_training_samples"]
    if missing:
        lines.append(f"- {missing} test users had no training sample; each went to the nearest centroid of its test "
                     "sequence's representation.")
    return "\n".join(lines)


def _gradients_section(summary: dict) -> str:
    method = (
        f"Gradient of the training loss w.r.t. the LoRA parameters on up to {summary['samples_per_cluster']} "
        f"training prompts per cluster (used: {summary['samples_used']}); cosine similarity between clusters "
        "(gradient_similarity.png). Low or negative values between clusters: their updates pull the shared "
        "parameters in different directions."
    )
    lines = [
        "## Gradient similarity between clusters",
        "",
        method,
        "",
        "| model | part | mean off-diagonal | min off-diagonal | share of pairs negative |",
        "|---|---|---|---|---|",
    ]
    for label, parts in summary["gradient_similarity"].items():
        for part, item in parts.items():
            lines.append(f"| {label} | {part} | {_fmt(item['mean_off_diagonal'])} | {_fmt(item['min_off_diagonal'])} | "
                         f"{_fmt(item['share_negative'])} |")
    return "\n".join(lines)


def _gate_section(gates: dict, tables: dict[str, pd.DataFrame]) -> str:
    if not gates:
        return "## Gate\n\nNo model with more than one expert: no gate to analyse."
    lines = ["## Gate", ""]
    for label, stats in gates.items():
        top_shares = ", ".join(f"{share:.2f}" for share in stats["top_expert_share"])
        details = (
            f"Normalised entropy (0: one expert, 1: all equally): per user {_fmt(stats['mean_user_entropy'])} on "
            f"average, of the mean mixture {_fmt(stats['mixture_entropy'])}. Share of users whose top expert is "
            f"expert 0..K-1: {top_shares}. Largest difference of an expert's mean weight between clusters: "
            f"{_fmt(stats['cluster_spread'])} (gate_weights.png)."
        )
        lines += [
            f"**{label}**: {stats['verdict']}",
            "",
            details,
            "",
            tables[f"gate_{label}"].drop(columns="model").to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    return "\n".join(lines).rstrip()
