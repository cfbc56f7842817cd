"""Pipeline folders written whole (save_pretrained into a temporary folder, then moved into place) and the model
card of pixel-space runs."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from difftrain.config import RunConfig
from difftrain.families.base import RunSummary
from difftrain.writes import atomic_write_text, check_writable, state_bytes, writing

logger = logging.getLogger(__name__)



def pipeline_modules(pipe) -> list:
    """The registered parts of a diffusers pipeline (models, scheduler, tokenizer...): what save_pretrained writes."""
    # Components are (library, class) entries of the config; other entries (DiTPipeline's id2label) are settings.
    return [getattr(pipe, name, None) for name, value in pipe.config.items()
            if not name.startswith("_") and isinstance(value, (list, tuple))]


def save_pipeline_atomically(pipe, output_dir: Path, what: str = "the exported pipeline") -> None:
    """save_pretrained into a temporary folder, then move each part into place.

    The folder is checked first (writable, room for the weights); a write that fails anyway removes
    `.export-tmp/` and leaves the previous export as it was, so the same command can simply run again.
    """
    check_writable(output_dir, state_bytes(pipeline_modules(pipe)), what)
    tmp = output_dir / ".export-tmp"
    with writing(what, output_dir, [tmp]):
        if tmp.exists():
            shutil.rmtree(tmp)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # Each saved component's folder (SDXL's text_encoder_2 and tokenizer_2 too), then the index naming them.
        components = [name for name, value in pipe.config.items()
                      if not name.startswith("_") and isinstance(value, (list, tuple)) and value[0] is not None]
        for name in [*components, "model_index.json"]:
            src, dst = tmp / name, output_dir / name
            if not src.exists():
                continue
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            src.replace(dst)
    shutil.rmtree(tmp, ignore_errors=True)


def card_front_matter(tags: list[str], pipeline_tag: str, base_model: str = "") -> str:
    """The YAML header of a model card (the hub reads library, tags, pipeline and base model from it)."""
    lines = ["---", "library_name: diffusers", "tags:", *(f"- {t}" for t in tags), f"pipeline_tag: {pipeline_tag}"]
    if base_model:
        lines.append(f"base_model: {base_model}")
    return "\n".join([*lines, "---"]) + "\n"


def card_loss_and_grid(summary: RunSummary) -> tuple[str, str]:
    """The final loss as the card prints it, and the Markdown image of the last sample grid ('' without one)."""
    loss = f"{summary.final_loss:.4f}" if summary.final_loss is not None else "n/a"
    return loss, (f"\n![samples]({summary.sample_grid})\n" if summary.sample_grid else "")


def write_model_card(cfg: RunConfig, summary: RunSummary, class_names: list[str], objective: str,
                     output_dir: Path) -> None:
    """OUTPUT_DIR/README.md of a pixel-space run; `objective` is the objective's `describe()`."""
    conditional = cfg.model.conditioning == "class"
    kind = cfg.model.conditioning
    transformer = cfg.model.backbone == "dit"
    network_class = (("PixArtTransformer2DModel" if kind == "text" else "DiTTransformer2DModel") if transformer
                     else ("UNet2DConditionModel" if kind == "text" else "UNet2DModel"))
    component = "transformer" if transformer else "unet"
    pipeline_class = {"class": "ClassConditionalPipeline", "text": "TextToImagePipeline"}.get(
        kind, "UnconditionalPipeline" if transformer else "DDPMPipeline")
    if kind == "text":
        te = cfg.text_encoder
        encoder = (f"pretrained `{te.pretrained}` ({'fine-tuned' if te.train else 'frozen'})" if te.pretrained
                   else f"from scratch ({te.num_layers}-layer CLIP-style transformer, width {te.hidden_size}, "
                        "word-level tokenizer built from the captions)")
        load = (
            "```python\nimport difftrain\n\n"
            f"pipe = difftrain.load_pipeline(\"{output_dir}\")\n"
            "image = pipe(\"" + (cfg.sample.prompts[0] if cfg.sample.prompts else "a prompt like the training captions")
            + "\", guidance_scale=5.0).images[0]\n```\n\n"
            f"diffusers has no pipeline for pixel-space text-conditioned {'transformers' if transformer else 'UNets'}, "
            "so this folder uses difftrain's `TextToImagePipeline` (a `DiffusionPipeline` subclass). Its parts load "
            f"with plain diffusers and transformers: `{network_class}.from_pretrained(\"{output_dir}\", "
            f"subfolder=\"{component}\")`, "
            f"`AutoTokenizer.from_pretrained(\"{output_dir}\", subfolder=\"tokenizer\")` and the text encoder "
            f"from `text_encoder/`.\n\nText encoder: {encoder}; prompts of {te.max_length} tokens"
            + (" (the transformer sees the tokenizer's attention mask, as diffusers' PixArt pipelines pass it)."
               if transformer else ".")
        )
    elif conditional:
        load = (
            "```python\nimport difftrain\n\n"
            f"pipe = difftrain.load_pipeline(\"{output_dir}\")\n"
            "images = pipe(class_labels=[0, 1, 2], guidance_scale=2.0).images\n```\n\n"
            f"diffusers has no pipeline for pixel-space class-conditional {network_class}s, so this folder uses "
            "difftrain's `ClassConditionalPipeline` (a `DiffusionPipeline` subclass). The network alone loads with "
            f"plain diffusers: `{network_class}.from_pretrained(\"{output_dir}\", subfolder=\"{component}\")`."
            + (" Its class table has 1,000 rows whatever the data's classes (row 1000 is the null class of guidance, "
               "as diffusers' DiTPipeline expects); only the classes listed below were trained." if transformer else "")
        )
    elif transformer:
        load = (
            "```python\nimport difftrain\n\n"
            f"pipe = difftrain.load_pipeline(\"{output_dir}\")\n"
            "images = pipe(batch_size=4).images\n```\n\n"
            "diffusers' DDPMPipeline calls its network without the class label a DiT needs (an unconditional DiT "
            "has one class, always 0), so this folder uses difftrain's `UnconditionalPipeline` (a `DiffusionPipeline` "
            f"subclass). The transformer alone loads with plain diffusers: `DiTTransformer2DModel.from_pretrained("
            f"\"{output_dir}\", subfolder=\"transformer\")`."
        )
    else:
        load = (
            "```python\nfrom diffusers import DDPMPipeline\n\n"
            f"pipe = DDPMPipeline.from_pretrained(\"{output_dir}\")\n"
            "image = pipe(num_inference_steps=1000).images[0]\n```"
        )
    classes = f"\n- Classes ({len(class_names)}): {', '.join(class_names)}" if conditional else ""
    loss, grid = card_loss_and_grid(summary)
    front = card_front_matter(["difftrain", "diffusion"],
                              "text-to-image" if kind == "text" else "unconditional-image-generation")
    text = f"""{front}
# {Path(cfg.output_dir).name}

A {dict(none='unconditional', text='text-to-image').get(kind, 'class-conditional')} pixel-space diffusion model (diffusers
`{network_class}`, {summary.num_parameters / 1e6:.2f}M parameters) trained from scratch with
[difftrain](https://github.com/difftrain/difftrain).
{grid}
## Training
- Data: {summary.data_description}: {summary.num_images} images at {cfg.data.resolution} px,
  {cfg.data.channels} channel(s){f'; {summary.num_skipped} file(s) skipped (unreadable, too large, dangling links or without a caption; named in train.log)' if summary.num_skipped else ''}{classes}
- Steps: {summary.steps} optimizer steps, {summary.images_seen} images seen ({summary.epochs:.1f} epochs),
  batch {cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} accumulation
- Objective: {objective}
- Optimizer: AdamW, learning rate {cfg.train.learning_rate:g} ({cfg.train.lr_scheduler}, {cfg.train.lr_warmup_steps} warm-up steps),
  mixed precision {cfg.train.mixed_precision}; weights exported {'as the EMA' if cfg.train.use_ema else 'as trained (no EMA)'}
- Final training loss: {loss}; training time: {summary.train_seconds / 60:.1f} min
- Full configuration: `config.yaml`; TensorBoard logs: `logs/`; sample grids: `samples/`

## How to load
Exported pipeline: `{pipeline_class}`.

{load}

Sample with any scheduler from the command line:
`difftrain sample {output_dir} --scheduler dpm++ --num-inference-steps 25 --out grid.png`
"""
    atomic_write_text(output_dir / "README.md", text, "the model card")
