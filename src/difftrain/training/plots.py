"""Loss and evaluation-metric curves from metrics.jsonl, as PNGs in OUTPUT_DIR/plots."""

from __future__ import annotations

import json
from pathlib import Path

from difftrain.writes import check_writable, replace_file

# Two small PNGs (about 600x350 and 1300x300 px at 100 dpi): their raw pixels bound their size.
_PLOTS_BYTES = 2 * 1300 * 350 * 4


def write_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval"]) for r in rows if "eval" in r]
    check_writable(out_dir, _PLOTS_BYTES, "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot([s for s, _ in losses], [v for _, v in losses], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "loss.png"))
    keys = [k for k in ("fid", "kid", "classifier_fid", "accuracy") if any(k in e for _, e in evals)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), dpi=100, squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(s, e[key]) for s, e in evals if key in e]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", lw=1)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "eval.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        replace_file(path, fig.savefig, "a plot", keep_suffix=True)  # matplotlib picks the format by extension
    finally:
        plt.close(fig)
    return path
