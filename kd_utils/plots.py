"""The report's figures: each takes a tidy table and returns a matplotlib Figure with a
title, labelled axes (with units) and a legend where there is more than one series."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .names import METHOD_ORDER


def _methods(values) -> list[str]:
    present = list(dict.fromkeys(values))
    return [m for m in METHOD_ORDER if m in present] + [m for m in present if m not in METHOD_ORDER]


def _ci95(x: pd.Series) -> float:
    """Half-width of a normal 95% CI of the mean (0 for a single value)."""
    x = x.dropna()
    return 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0


def loss_curve(history: pd.DataFrame | list[dict], title: str) -> plt.Figure:
    """Training loss per step, and validation cross-entropy where evaluated."""
    h = pd.DataFrame(history)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(h["step"], h["loss"], lw=0.8, label="training loss")
    if "val_loss" in h:
        v = h.dropna(subset=["val_loss"])
        ax.plot(v["step"], v["val_loss"], "o-", label="validation cross-entropy")
    ax.set(title=title, xlabel="optimizer step", ylabel="loss (nats per target token)")
    ax.legend()
    fig.tight_layout()
    return fig


def run_label(row) -> str:
    """A model of results.csv named without its seed: 'micro-xs sft', 'micro-xs <- micro-m fkl t1'
    (plus 'noise 5' or 'base teacher' where they apply)."""
    if row["kind"] != "kd":
        return f"{row['student']} {row['method']}"
    label = f"{row['student']} <- {row['teacher']} {row['method']} t{row['temperature']:g}"
    if row["noise"]:
        label += f" noise {row['noise']:g}"
    return label + (" base teacher" if row["teacher_kind"] == "base" else "")


def accuracy_heatmap(results: pd.DataFrame, title: str = "Accuracy per model and task") -> plt.Figure:
    """Models (rows: mean over seeds; by student size, then SFT before the methods in METHOD_ORDER)
    x tasks (columns), accuracy in percent."""
    runs = results.assign(run=results.apply(run_label, axis=1),
                          rank=results["method"].map({m: i for i, m in enumerate(["sft", "base", *METHOD_ORDER])}))
    order = runs.drop_duplicates("run").sort_values(["student_params", "rank", "run"])["run"]
    table = runs.pivot_table(index="run", columns="task", values="accuracy", aggfunc="mean", sort=False)
    table = table.reindex(order)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * table.shape[1], 1.2 + 0.36 * table.shape[0]))
    im = ax.imshow(table.values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=9)
    for (i, j), v in np.ndenumerate(table.values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    seeds = results["seed"].nunique()
    ax.set_title(title + (f" (mean over {seeds} seeds)" if seeds > 1 else ""))
    fig.tight_layout()
    return fig


def gain_vs(gains: pd.DataFrame, x: str, xlabel: str, title: str, log_x: bool = False) -> plt.Figure:
    """KD gain (points over the student's SFT) against a covariate, one colour per method,
    method means with 95% CIs per x value."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(_methods(gains["method"])):
        g = gains[gains["method"] == method]
        jitter = 1 + 0.03 * (i - 1) if log_x else 0
        agg = g.groupby(x)["gain"].agg(["mean", _ci95]).reset_index()
        xs = agg[x] * jitter if log_x else agg[x]
        ax.errorbar(xs, agg["mean"], yerr=agg["_ci95"], fmt="o-", capsize=3, label=method)
        ax.scatter(g[x] * (jitter if log_x else 1), g["gain"], s=8, alpha=0.3, color=ax.lines[-1].get_color())
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    if log_x:
        ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel="KD gain over SFT (accuracy points)")
    ax.legend(title="method")
    fig.tight_layout()
    return fig


def gain_heatmap(gains: pd.DataFrame, title: str = "KD gain per student and task") -> plt.Figure:
    """Mean gain (points) per (student <- teacher, method) row and task."""
    g = gains.assign(run=gains["student"] + " <- " + gains["teacher"] + " / " + gains["method"],
                     size=gains["student_params"]).sort_values(["size", "teacher", "method"])
    table = g.pivot_table(index="run", columns="task", values="gain", aggfunc="mean", sort=False)
    lim = max(1.0, float(np.nanmax(np.abs(table.values))))
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * table.shape[1], 1.2 + 0.36 * table.shape[0]))
    im = ax.imshow(table.values, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=9)
    for (i, j), v in np.ndenumerate(table.values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:+.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="gain (accuracy points)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def accuracy_vs_fidelity(gains: pd.DataFrame, fidelity: str = "fidelity",
                         title: str = "Accuracy gain against fidelity to the teacher") -> plt.Figure:
    """The paradox as a figure: gain (y) against agreement or BLEU with the teacher (x),
    one colour per method, marker size by student size."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    sizes = gains["student_params"]
    scale = 20 + 120 * (np.log(sizes) - np.log(sizes.min())) / max(1e-9, np.log(sizes.max()) - np.log(sizes.min()))
    for method in _methods(gains["method"]):
        m = gains["method"] == method
        ax.scatter(gains.loc[m, fidelity], gains.loc[m, "gain"], s=scale[m], alpha=0.7, label=method)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    label = "rationale BLEU vs teacher (0-100)" if fidelity == "fidelity" else "answer agreement with teacher (%)"
    ax.set(title=title, xlabel=label, ylabel="KD gain over SFT (accuracy points)")
    ax.legend(title="method (size = student params)")
    fig.tight_layout()
    return fig


def ablation_curve(frame: pd.DataFrame, x: str, xlabel: str, title: str, group: str = "student") -> plt.Figure:
    """Mean accuracy (over tasks) against an ablation axis, one line per group, 95% CI bars."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, g in frame.groupby(group, sort=False):
        agg = g.groupby(x)["accuracy"].agg(["mean", _ci95]).reset_index()
        ax.errorbar(agg[x], agg["mean"], yerr=agg["_ci95"], fmt="o-", capsize=3, label=str(name))
    ax.set(title=title, xlabel=xlabel, ylabel="mean accuracy over tasks (%)")
    ax.legend(title=group)
    fig.tight_layout()
    return fig


def paired_bars(frame: pd.DataFrame, group: str, series: str, title: str, ylabel: str) -> plt.Figure:
    """Grouped bars of mean `accuracy` with 95% CIs: groups on x, one bar per series value."""
    groups, values = list(dict.fromkeys(frame[group])), list(dict.fromkeys(frame[series]))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(groups)), 4))
    w = 0.8 / max(1, len(values))
    for i, v in enumerate(values):
        sub = frame[frame[series] == v].groupby(group)["accuracy"].agg(["mean", _ci95]).reindex(groups)
        ax.bar(np.arange(len(groups)) + i * w, sub["mean"], w, yerr=sub["_ci95"], capsize=3, label=str(v))
    ax.set_xticks(np.arange(len(groups)) + w * (len(values) - 1) / 2, groups, rotation=20)
    ax.set(title=title, xlabel=group, ylabel=ylabel)
    ax.legend(title=series)
    fig.tight_layout()
    return fig
