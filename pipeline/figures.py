"""The PNG figures in `reports/figures/`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipeline import CLASSES
from pipeline.atomic import write_bytes_atomic
from pipeline.imageops import IMAGE_SUFFIXES, read_image


def _save(fig: plt.Figure, path: Path, dpi: int = 100) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def plot_samples(split_dir: Path, out: Path, per_class: int = 8) -> None:
    """A grid with the first `per_class` faces of each emotion, one row per emotion."""
    fig, axes = plt.subplots(
        len(CLASSES), per_class, figsize=(per_class * 1.2, len(CLASSES) * 1.3), squeeze=False
    )
    for row, name in enumerate(CLASSES):
        folder = split_dir / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(files):
                ax.imshow(read_image(files[col]), cmap="gray", vmin=0, vmax=255)
        axes[row][0].set_title(name, loc="left", fontsize=10)
    fig.suptitle("Sample faces per emotion")
    _save(fig, out)


def plot_training_curves(history: pd.DataFrame, out: Path, optimizer: str = "Adam") -> None:
    """Loss and accuracy per epoch, drawn the way the seed notebook drew them."""
    with plt.style.context("dark_background"):
        fig = plt.figure(figsize=(20, 10))
        plt.subplot(1, 2, 1)
        plt.suptitle(f"Optimizer : {optimizer}", fontsize=10)
        plt.ylabel("Loss", fontsize=16)
        plt.plot(history["epoch"], history["loss"], label="Training Loss")
        plt.plot(history["epoch"], history["val_loss"], label="Validation Loss")
        plt.legend(loc="upper right")
        plt.subplot(1, 2, 2)
        plt.ylabel("Accuracy", fontsize=16)
        plt.plot(history["epoch"], history["accuracy"], label="Training Accuracy")
        plt.plot(history["epoch"], history["val_accuracy"], label="Validation Accuracy")
        plt.legend(loc="lower right")
        _save(fig, out)


def plot_confusion(
    matrix: np.ndarray, class_names: Sequence[str], out: Path, split: str = "validation"
) -> None:
    """Heatmaps of the confusion counts and of the row-normalised rates."""
    import seaborn as sns

    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(18, 7.5))
    sns.heatmap(
        matrix,
        annot=True,
        fmt="d",
        cmap="Blues",
        ax=left,
        xticklabels=class_names,
        yticklabels=class_names,
        cbar=False,
    )
    left.set_title("Counts")
    sns.heatmap(
        rates,
        annot=True,
        fmt=".2f",
        cmap="Blues",
        vmin=0,
        vmax=1,
        ax=right,
        xticklabels=class_names,
        yticklabels=class_names,
    )
    right.set_title("Share of each actual class")
    for ax in (left, right):
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Actual")
    fig.suptitle(f"Confusion matrix ({split})")
    _save(fig, out)


def plot_reliability(bins: dict[str, list[dict]], temperature: float, out: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, one line per split."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    for split, rows in bins.items():
        used = [r for r in rows if r["count"]]
        ax.plot(
            [r["confidence"] for r in used],
            [r["accuracy"] for r in used],
            marker="o",
            label=f"{split} ({sum(r['count'] for r in used)} images)",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("Confidence (probability of the predicted label)")
    ax.set_ylabel("Accuracy")
    note = "" if temperature == 1.0 else f", temperature {temperature:g}"
    ax.set_title(f"Reliability{note}")
    ax.legend(loc="upper left")
    _save(fig, out)


def plot_message(text: str, out: Path) -> None:
    """A small figure that only says `text` (a declared figure with nothing to draw)."""
    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    _save(fig, out)
