"""Evaluation outputs: curves and summary as Parquet, a Markdown table, and a PNG plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from metaopt.evaluate.harness import Result  # noqa: E402


def curves_frame(results: Sequence[Result]) -> pd.DataFrame:
    """One row per (optimizer, run, step) with the loss there."""
    frames = []
    for result in results:
        runs, steps = result.losses.shape
        frames.append(
            pd.DataFrame(
                {
                    "optimizer": result.name,
                    "run": torch.arange(runs).repeat_interleave(steps).numpy(),
                    "step": torch.arange(steps).repeat(runs).numpy(),
                    "loss": result.losses.reshape(-1).double().numpy(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def summary_frame(results: Sequence[Result]) -> pd.DataFrame:
    """One row per optimizer: its settings and final-loss statistics over runs."""
    rows = []
    for result in results:
        final = result.final_losses.double()
        finite = torch.isfinite(final)
        mean = float(final.mean()) if finite.all() else math.inf
        std = float(final[finite].std()) if finite.sum() > 1 else math.nan
        spec = result.optimizer.spec()
        rows.append(
            {
                "optimizer": result.name,
                "kind": spec["kind"],
                "lr": spec["hyperparameters"].get("lr", math.nan),
                "runs": final.numel(),
                "steps": result.losses.shape[1] - 1,
                "final_loss_mean": mean,
                "final_loss_std": std,
                "final_loss_sem": std / math.sqrt(final.numel()),
                "final_loss_median": float(final[finite].median()) if finite.any() else math.nan,
                "log10_mean_final_loss": math.log10(mean) if 0 < mean < math.inf else math.nan,
                "diverged_runs": int((~finite).sum()),
            }
        )
    return pd.DataFrame(rows)


def markdown_table(summary: pd.DataFrame) -> str:
    """Final loss mean ± std, its standard error and log10 of the mean, one row per optimizer."""
    lines = [
        "| optimizer | lr | final loss (mean ± std) | standard error | log10 mean final loss | diverged runs |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        lr = "—" if math.isnan(row.lr) else f"{row.lr:g}"
        if row.diverged_runs:
            loss, sem, log10 = "diverged", "—", "—"
        else:
            loss, log10 = f"{row.final_loss_mean:.4f} ± {row.final_loss_std:.4f}", f"{row.log10_mean_final_loss:.3f}"
            sem = f"{row.final_loss_sem:.4f}"
        lines.append(f"| {row.optimizer} | {lr} | {loss} | {sem} | {log10} | {row.diverged_runs}/{row.runs} |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Sequence[Result], path: Path, title: str) -> None:
    """Mean loss against step on a log scale, one line per optimizer, interquartile range shaded."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        losses = result.losses.double()
        steps = torch.arange(losses.shape[1]).numpy()
        (line,) = ax.plot(steps, losses.mean(0).numpy(), label=result.name)
        low, high = torch.nanquantile(losses, torch.tensor([0.25, 0.75], dtype=losses.dtype), dim=0)
        ax.fill_between(steps, low.numpy(), high.numpy(), color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over runs; 25–75% shaded)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Sequence[Result], output_dir: Path, title: str) -> str:
    """Write curves.parquet, summary.parquet, table.md and curves.png; return the table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    curves_frame(results).to_parquet(output_dir / "curves.parquet", index=False)
    summary = summary_frame(results)
    summary.to_parquet(output_dir / "summary.parquet", index=False)
    table = markdown_table(summary)
    (output_dir / "table.md").write_text(f"# {title}\n\n{table}")
    plot_curves(results, output_dir / "curves.png", title)
    return table
