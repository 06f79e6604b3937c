"""Plots with matplotlib (Agg, no pyplot state): training curves from DIR/metrics.jsonl, the per-dimension
KL bar chart, 2-d projections of posterior means, the decoded 2-d manifold.

Each plot function takes plain arrays (the math lives in editing.py and evaluate.py) and writes one PNG to
`out`, a path or a binary file object, which it returns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .checkpoint import atomic_file
from .data import DataError

Out = str | Path | IO[bytes]
DPI = 100


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of DIR/metrics.jsonl, in order. A torn last line (a crash mid-write) is dropped."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise DataError(f"{path} is missing; is {path.parent} an hvae run directory?") from None
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}: line {i + 1} is not a JSON object; the file is damaged") from None
        records.append(record)
    return records


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _write(fig: Figure, out: Out) -> Out:
    """The figure as PNG into `out`: a file object, or a path (written atomically)."""
    if not isinstance(out, (str, Path)):
        fig.savefig(out, format="png")
        return out
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        fig.savefig(f, format="png")
    return out


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(step, value) for the records that hold `key` as a number."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return (np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float))


def _line(ax, steps: np.ndarray, values: np.ndarray, label: str, marker_only: bool = False) -> bool:
    if len(steps) == 0:
        return False
    style = {"marker": "o", "linestyle": "none"} if marker_only else {"marker": "o" if len(steps) < 20 else None}
    ax.plot(steps, values, label=label, **style)
    return True


def plot_training_curves(records: list[dict[str, Any]], out: Out) -> Out:
    """Three panels over training steps: the loss; ELBO and reconstruction (nats, higher is better; the
    per-epoch train/validation means as points); the KL, per level when there are several."""
    fig, (ax_loss, ax_elbo, ax_kl) = _new_figure(13, 3.6, 3)
    plotted = [_line(ax_loss, *_series(records, "loss"), "loss (minimized)")]
    plotted.append(any([_line(ax_elbo, *_series(records, "elbo"), "ELBO"),
                        _line(ax_elbo, *_series(records, "reconstruction"), "reconstruction"),
                        _line(ax_elbo, *_series(records, "train_elbo"), "train ELBO (epoch mean)", True),
                        _line(ax_elbo, *_series(records, "val_elbo"), "validation ELBO", True)]))
    kl_lines = [_line(ax_kl, *_series(records, "kl"), "KL (all levels)"),
                _line(ax_kl, *_series(records, "train_kl"), "train KL (epoch mean)", True)]
    per_level = [(r["step"], r["kl_per_level"]) for r in records if isinstance(r.get("kl_per_level"), list)]
    n_levels = max((len(v) for _, v in per_level), default=0)
    for t in range(n_levels if n_levels > 1 else 0):
        pts = [(s, v[t]) for s, v in per_level if len(v) > t]
        kl_lines.append(_line(ax_kl, np.array([p[0] for p in pts]), np.array([p[1] for p in pts]), f"KL level {t + 1}"))
    plotted.append(any(kl_lines))
    for ax, title, ylabel, has in zip((ax_loss, ax_elbo, ax_kl), ("training loss", "ELBO terms", "rate (KL)"),
                                      ("nats", "nats per image", "nats per image"), plotted):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if has:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _write(fig, out)


def plot_kl_per_dimension(kl_per_level: Sequence[np.ndarray], out: Out,
                          active: Sequence[np.ndarray] | None = None) -> Out:
    """Bars of each unit's mean rate (nats), one panel per level; active units (Cov_x E_q[z_u] > 0.01)
    in colour, inactive ones grey, when `active` is given."""
    fig, axes = _new_figure(max(4.0, 4.5 * len(kl_per_level)), 3.2, len(kl_per_level))
    for t, (ax, kl) in enumerate(zip(axes, kl_per_level)):
        kl = np.asarray(kl, dtype=float).ravel()
        colours = "tab:blue" if active is None else np.where(np.asarray(active[t]).ravel(), "tab:blue", "tab:gray")
        ax.bar(np.arange(len(kl)), kl, color=colours)
        n_active = "" if active is None else f", {int(np.sum(active[t]))} of {len(kl)} active"
        ax.set_title(f"level {t + 1}: {kl.sum():.2f} nats{n_active}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("latent dimension")
        ax.set_ylabel("KL (nats)")
    return _write(fig, out)


def plot_latent_projection(points: np.ndarray, out: Out, labels: np.ndarray | None = None,
                           class_names: Sequence[str] | None = None, title: str = "posterior means",
                           axis_labels: tuple[str, str] = ("component 1", "component 2")) -> Out:
    """Scatter of 2-d points [N, 2] (a projection of posterior means), coloured by integer label."""
    fig, (ax,) = _new_figure(5.5, 4.5)
    points = np.asarray(points, dtype=float)
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
    else:
        labels = np.asarray(labels).ravel()
        classes = np.unique(labels)
        palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for i, c in enumerate(classes):
            sel = labels == c
            name = class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) else str(c)
            ax.scatter(points[sel, 0], points[sel, 1], s=6, alpha=0.7, color=palette(i % palette.N), label=name)
        if len(classes) <= 20:
            ax.legend(fontsize="x-small", markerscale=2, loc="best")
    ax.set_title(title)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    return _write(fig, out)


def plot_manifold(images: np.ndarray, values: np.ndarray, out: Out) -> Out:
    """The decoded 2-d latent plane: images [n, n, C, H, W] in [0, 1] (row i: z_2 = values[::-1][i];
    column j: z_1 = values[j]) tiled into one picture with z-value ticks."""
    images = np.asarray(images, dtype=float)
    n_rows, n_cols, c, h, w = images.shape
    tiled = images.transpose(0, 3, 1, 4, 2).reshape(n_rows * h, n_cols * w, c)  # [n*H, n*W, C]
    fig, (ax,) = _new_figure(6, 6)
    ax.imshow(tiled[..., 0] if c == 1 else tiled, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    values = np.asarray(values, dtype=float)
    ticks = np.arange(0, n_cols, max(1, n_cols // 5))
    ax.set_xticks(ticks * w + w / 2, [f"{values[i]:.1f}" for i in ticks])
    ax.set_yticks(ticks * h + h / 2, [f"{values[::-1][i]:.1f}" for i in ticks])
    ax.set_xlabel("z_1")
    ax.set_ylabel("z_2")
    ax.set_title("decoded latent plane (means of p(x|z))")
    return _write(fig, out)


def plot_sample_quality(samples: list[dict[str, Any]], references: dict[str, dict[str, Any]], out: Out) -> Out:
    """Two panels against sampling temperature: the Fréchet distance (the reference rows as dashed lines), and
    precision and recall. `samples`: rows with temperature, fid, precision, recall (sample_quality.py)."""
    fig, (ax_fd, ax_pr) = _new_figure(9, 3.4, 2)
    t = np.array([r["temperature"] for r in samples], dtype=float)
    _line(ax_fd, t, np.array([r["fid"] for r in samples], dtype=float), "samples")
    for (name, row), color in zip(references.items(), ("gray", "tab:green")):
        ax_fd.axhline(row["fid"], linestyle="--", color=color, label=f"{name} (reference)")
    _line(ax_pr, t, np.array([r["precision"] for r in samples], dtype=float), "precision")
    _line(ax_pr, t, np.array([r["recall"] for r in samples], dtype=float), "recall")
    ax_pr.set_ylim(0, 1.02)
    for ax, title in ((ax_fd, "Fréchet distance (LeNet features)"), (ax_pr, "k-NN precision and recall")):
        ax.set_title(title)
        ax.set_xlabel("sampling temperature")
        ax.legend(fontsize="small")
    return _write(fig, out)
