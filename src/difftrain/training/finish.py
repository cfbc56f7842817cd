"""The end of a finished run: the last preview grid, the export of the EMA weights, the model card, the loss
plots, and the optional hub upload."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from difftrain.errors import HubUploadError
from difftrain.families.base import RunSummary
from difftrain.training.previews import EmaWeights, save_samples
from difftrain.training.setup import TrainingRun

logger = logging.getLogger(__name__)


def finish_run(run: TrainingRun, output_dir: Path, last_sample: Optional[Path], final_loss: Optional[float],
               train_start: float, num_parameters: int) -> None:
    """Everything after the last step; every rank calls it (the main process writes)."""
    plan, accelerator, t = run.plan, run.accelerator, run.cfg.train
    if accelerator.is_main_process:
        if last_sample is None or last_sample.name != f"step-{plan.max_steps:06d}.png":
            last_sample = save_samples(run, output_dir, plan.max_steps)
        with EmaWeights(run) as network:
            run.family.export(network, run.objective, output_dir)
        dataset = plan.dataset
        summary = RunSummary(
            data_description=dataset.description, num_images=len(dataset), num_skipped=len(dataset.skipped),
            steps=plan.max_steps, images_seen=plan.max_steps * plan.global_batch_size,
            epochs=plan.max_steps * plan.global_batch_size / plan.num_train_images, num_parameters=num_parameters,
            train_seconds=time.perf_counter() - train_start, final_loss=final_loss,
            sample_grid=str(last_sample.relative_to(output_dir)),
        )
        run.family.write_model_card(summary, run.objective, output_dir)
        logger.info("exported pipeline to %s; samples: %s", output_dir, last_sample)
        from difftrain.training.plots import write_plots

        plots = write_plots(output_dir / "metrics.jsonl", output_dir / "plots")
        logger.info("plots: %s", ", ".join(str(p) for p in plots))
    accelerator.wait_for_everyone()
    if t.push_to_hub and accelerator.is_main_process:
        url = push_to_hub(output_dir, t.hub_model_id, t.hub_private)
        logger.info("pushed to %s", url)


def push_to_hub(output_dir: Path, repo_id: str, private: bool) -> str:
    """Upload the exported folder (without training checkpoints). Raises HubUploadError with the reason."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, private=private, exist_ok=True)
        info = upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            ignore_patterns=["checkpoints/*", ".*", "**/.*"],
            commit_message="Upload difftrain run",
        )
    except Exception as exc:  # network, auth, permissions: all reported the same way
        raise HubUploadError(
            f"could not push {output_dir} to the hub as {repo_id!r}: {type(exc).__name__}: {exc}. "
            f"The local export in {output_dir} is complete; push it later with "
            f"`huggingface-cli upload {repo_id} {output_dir}`."
        ) from exc
    return str(getattr(info, "commit_url", repo_id))
