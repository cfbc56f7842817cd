"""Typed run configuration schema: one dataclass per section, the type aliases they use, and ConfigError.

A run is described by one :class:`RunConfig`. Field docstrings are the user documentation:
scripts/gen_config_docs.py reads this file to write docs/config.md. Loading and checking live in
``loading.py`` and ``checks.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Union, Literal, Optional

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
SchedulerName = Literal["ddpm", "ddim", "dpm++", "unipc", "euler", "euler-a", "heun"]
FLOW_SCHEDULERS = ("euler", "heun", "dpm++", "unipc")
"""The sample.scheduler names that can sample a flow-matching model (sampling/schedulers.py builds their flow kinds)."""
FLOW_ONLY_FIELDS = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "flow_shift",
                    "flow_shift_by_resolution", "loss_weighting")
"""diffusion.* fields that only the flow-matching objective reads."""
DDPM_ONLY_FIELDS = ("beta_schedule", "beta_start", "beta_end", "prediction_type", "snr_gamma")
"""diffusion.* fields that only the DDPM objective reads."""


@dataclass
class DataConfig:
    path: str = "digits"
    """'digits' (scikit-learn, built in), an image folder, an MNIST IDX folder, a hub id, a saved `datasets` dir, or streamed shards: a folder or glob of webdataset .tar files or of .parquet files."""
    source: Literal["auto", "digits", "mnist", "folder", "hub", "webdataset", "parquet"] = "auto"
    """How to read `path`; 'auto' decides from what is there (a folder holding only .tar or only .parquet files, or a glob ending in .tar / .parquet, is streamed)."""
    split: str = "train"
    """Split of hub / MNIST data ('train' or 'test' for MNIST)."""
    streaming: bool = False
    """Stream a hub id's parquet files (its parquet conversion, or the parquet files of its main revision) instead of downloading and decoding the set up front."""
    image_column: str = "image"
    """Image column of a `datasets` data set or of streamed parquet files (a `datasets` Image struct or encoded bytes)."""
    label_column: Optional[str] = None
    """Label column of a `datasets` data set or of streamed parquet files; None means 'label' when the model is class-conditional."""
    resolution: int = 32
    """Training image size in pixels (square)."""
    channels: Literal[1, 3] = 3
    """1 = grayscale, 3 = RGB; images are converted on load."""
    center_crop: bool = True
    """Resize the short side then center-crop; False squashes the image to a square."""
    random_flip: bool = False
    """Random horizontal flip, drawn per image each step."""
    captions: Literal["auto", "template", "sidecar", "metadata", "column"] = "auto"
    """Where captions come from (text models): 'auto' picks template, column, metadata file or sidecar .txt."""
    caption_template: Optional[str] = None
    """Caption from the class label, e.g. 'A handwritten digit {label}' or 'a photo of a {label}'."""
    caption_column: Optional[str] = None
    """Caption column of a `datasets` data set (or of metadata.jsonl / metadata.csv)."""
    caption_lines: Literal["join", "choose"] = "join"
    """Sidecar .txt files: 'join' makes the whole file one caption; 'choose' makes each non-empty line a caption of the image, one drawn per step. A metadata or column value that is a list is always several captions."""
    caption_prefix: Optional[str] = None
    """Put first in every training caption (a trigger word, e.g. 'sks dog'), joined by tag_separator; tag shuffling and tag dropout never move or drop it. Template-made evaluation prompts get it too."""
    shuffle_tags: bool = False
    """Shuffle each caption's tag_separator-separated tags every step (after the first keep_tokens), drawn from the step's generator: the same (seed, step) gives the same captions."""
    keep_tokens: int = 0
    """Tags at the start of each caption that shuffle_tags and tag_dropout leave in place (kohya's keep_tokens; the prefix is not counted)."""
    tag_dropout: float = 0.0
    """Probability of leaving out each tag (after the first keep_tokens) of a caption in a step."""
    tag_separator: str = ","
    """What separates the tags of a caption for shuffle_tags, tag_dropout and keep_tokens."""
    buckets: Union[Literal["off", "auto"], list] = "off"
    """Aspect-ratio buckets: 'off' trains square crops at data.resolution; 'auto' makes buckets of about data.resolution^2 pixels with aspect ratios from 1:4 to 4:1 and sides that are multiples of what the network takes (64 for Stable Diffusion: VAE 8 x UNet 8); or a list of 'WxH' sizes. Each image is resized to the bucket of nearest aspect ratio with the least crop, and each micro-batch comes from one bucket. Samples and previews stay square."""
    mask_dir: Optional[str] = None
    """Folder of loss masks: the mask of image REL/NAME.ext is mask_dir/REL/NAME.png (same size as its image; white trains, black is ignored). Without it, a file NAME.mask.png beside NAME.ext is the image's mask. Images without a mask train everywhere."""
    max_images: Optional[int] = None
    """Use only the first N images (after sorting), e.g. for quick trials."""
    instance_dir: Optional[str] = None
    """DreamBooth: folder of the subject's images, all captioned `instance_prompt` (used instead of `path`)."""
    instance_prompt: Optional[str] = None
    """DreamBooth: caption of every instance image, e.g. 'a photo of sks flower'."""
    class_prompt: Optional[str] = None
    """DreamBooth prior preservation: prompt of the class images, e.g. 'a photo of a flower'."""
    class_dir: Optional[str] = None
    """DreamBooth prior preservation: folder of class images; missing ones are generated with the base model. None: OUTPUT_DIR/class_images."""
    num_class_images: int = 100
    """DreamBooth prior preservation: class images to use (generated up to this count)."""
    decode_workers: int = 4
    """Threads that decode images once at start-up into RAM, or processes that build the disk cache (data.max_memory_gb) or count the samples of streamed shards (once; the counts are cached)."""
    max_image_pixels: int = 50_000_000
    """Images with more pixels (width x height, read from the file header) are skipped before decoding. 50 MP holds a modern phone photo (up to ~50 MP) and stays well under PIL's bomb limit (89.5 MP); raise it for larger scans (PIL itself refuses files over 179 MP)."""
    max_memory_gb: Optional[float] = None
    """Decoded data up to this size is held in RAM; a larger set is decoded once into a memory-mapped cache on disk (data.cache_dir) and read from there. None: a quarter of the machine's RAM."""
    loader_workers: Optional[int] = None
    """Worker processes per training process that read micro-batches ahead when the data is not in RAM (disk cache, streamed shards); None: 1 on CPU (more would take cores from the step), up to 8 with an accelerator."""
    cache_dir: Optional[str] = None
    """Folder of the decoded-data caches (one subfolder per source and decode settings); None: DIFFTRAIN_CACHE/data."""


@dataclass
class ModelConfig:
    backbone: Literal["unet", "dit"] = "unet"
    """Denoising network: 'unet' (diffusers UNet2DModel, UNet2DConditionModel for text) or 'dit' (a transformer on patches: DiTTransformer2DModel, PixArtTransformer2DModel for text)."""
    size: Literal["tiny", "small", "base", "custom"] = "small"
    """Size preset of the backbone (models/unet.py, models/backbone.py; 'base' DiT is DiT-S); 'custom' uses the explicit settings alone."""
    conditioning: Literal["none", "class", "text"] = "none"
    """'class': class embedding with a null class; 'text': UNet2DConditionModel with cross-attention on a text encoder."""
    num_classes: Optional[int] = None
    """Number of classes; None takes it from the data."""
    unet: dict = field(default_factory=dict)
    """Explicit diffusers UNet kwargs (UNet2DModel, or UNet2DConditionModel for text), applied over the size preset."""
    patch_size: Optional[int] = None
    """DiT: pixels (or latent cells) per patch side; None takes the size preset's. Must divide the sample size."""
    depth: Optional[int] = None
    """DiT: transformer blocks; None takes the size preset's."""
    width: Optional[int] = None
    """DiT: hidden width; None takes the size preset's. Must divide by num_heads."""
    num_heads: Optional[int] = None
    """DiT: attention heads; None takes the size preset's."""
    transformer: dict = field(default_factory=dict)
    """Explicit diffusers transformer kwargs (DiTTransformer2DModel, or PixArtTransformer2DModel for text), applied over the settings above."""
    space: Literal["pixel", "latent"] = "pixel"
    """'latent' trains the network on VAE latents (see the `vae` section); text-conditioned latent runs export a StableDiffusionPipeline (UNet) or a PixArtSigmaPipeline (DiT), class-conditional and unconditional ones (model.backbone = 'dit') diffusers' DiTPipeline."""
    pretrained: Optional[str] = None
    """Stable Diffusion style pipeline (hub id or local dir) to fine-tune: its UNet, VAE, text encoder, tokenizer and noise schedule are used."""
    finetune: Literal["full", "lora"] = "full"
    """With `pretrained`: train the whole UNet, or LoRA adapters on its attention layers (see `lora`)."""


@dataclass
class VaeConfig:
    pretrained: Optional[str] = None
    """AutoencoderKL (hub id or local dir, or a pipeline folder with vae/) for latent runs, kept frozen; None trains one first. With model.pretrained it replaces the base pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16) and is exported with a full fine-tune."""
    precision: Literal["fp32", "mixed"] = "fp32"
    """dtype of the frozen VAE: fp32 whatever train.mixed_precision is (SDXL's VAE gives NaN latents in fp16), or 'mixed': the mixed-precision dtype (less memory; for VAEs that are safe in it)."""
    scaling_factor: Optional[float] = None
    """Latent scale; None takes the VAE config's, or measures 1/std of the data's latents for a VAE trained here."""
    block_out_channels: list = field(default_factory=lambda: [32, 64, 64])
    """Widths of a from-scratch VAE; the latent is 2^(len-1) times smaller than the image per side."""
    layers_per_block: int = 1
    """ResNet layers per level of a from-scratch VAE."""
    latent_channels: int = 4
    """Latent channels of a from-scratch VAE."""
    train_steps: Optional[int] = None
    """Optimizer steps of from-scratch VAE training (reconstruction + KL); None: as many as the diffusion stage (train.max_steps, or the steps of train.num_epochs), at most 500. The run logs the stage's length and estimated time after its first steps."""
    batch_size: int = 16
    """Images per VAE training step."""
    learning_rate: float = 1e-3
    """AdamW learning rate of VAE training."""
    kl_weight: float = 1e-6
    """Weight of the KL term of VAE training."""
    cache_latents: bool = True
    """Encode the data once (both flips with data.random_flip) and sample latents from the cached distributions; False encodes every step."""
    cache_latents_to_disk: bool = False
    """Write the cached latent distributions (per bucket, both flips) to a disk cache under $DIFFTRAIN_CACHE/latents and memory-map them while training, instead of holding them in memory: for data sets whose latents do not fit. Keyed by the VAE's weights (a VAE trained in the run too), config and dtype, the decoded images (every pixel, so the resolution and buckets) and data.random_flip; a later run where they match reuses it without running the VAE encoder. The same values as the in-memory cache. Needs vae.cache_latents and a latent run."""


@dataclass
class LoraConfig:
    rank: int = 4
    """LoRA rank r."""
    alpha: Optional[float] = None
    """LoRA alpha (scale = alpha / rank); None means alpha = rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    unet_target_modules: list = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    """UNet modules that get adapters (attention projections by default)."""
    train_text_encoder: bool = False
    """Also put adapters on the text encoder."""
    text_encoder_target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder modules that get adapters."""
    export_merged: bool = False
    """Also export the base pipeline with the adapters merged into its weights (OUTPUT_DIR/merged)."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, peft's use_dora): a trained magnitude per output feature on top of the LoRA direction; exported in the diffusers format only."""
    rank_pattern: dict = field(default_factory=dict)
    """Per-module ranks, e.g. {attn2.to_k: 8}: a module-name suffix or a regex matched against the end of the name (peft's rank_pattern), applied to the UNet and the text encoders; other modules keep `rank`."""
    alpha_pattern: dict = field(default_factory=dict)
    """Per-module alphas, keyed as rank_pattern (peft's alpha_pattern); other modules keep `alpha`."""
    export_format: Literal["diffusers", "kohya", "both"] = "diffusers"
    """LoRA file format: 'diffusers' (pytorch_lora_weights.safetensors, what `pipe.load_lora_weights(dir)` reads), 'kohya' (pytorch_lora_weights_kohya.safetensors, lora_unet_/lora_te_ keys with .alpha, for A1111, ComfyUI and kohya's scripts; diffusers reads it with weight_name=) or 'both'."""


@dataclass
class TextEncoderConfig:
    pretrained: Optional[str] = None
    """Hub id or local dir of a transformers text model + tokenizer (e.g. openai/clip-vit-base-patch32); None builds one from scratch."""
    train: Optional[bool] = None
    """Train the encoder; None means train a from-scratch encoder and freeze a pretrained one."""
    learning_rate: Optional[float] = None
    """Learning rate of a trained encoder; None uses train.learning_rate."""
    max_length: int = 77
    """Tokens per prompt (the seed used 8); longer prompts are truncated with a warning."""
    hidden_size: int = 128
    """Width of a from-scratch encoder (also the UNet's cross_attention_dim)."""
    num_layers: int = 2
    """Transformer layers of a from-scratch encoder."""
    num_heads: int = 4
    """Attention heads of a from-scratch encoder."""
    cache_to_disk: bool = False
    """Write a frozen encoder's outputs for every distinct caption to a disk cache under $DIFFTRAIN_CACHE (keyed by the encoder's weights, tokenizer, max_length and captions; reused by later runs) and memory-map them while training, instead of holding them in RAM (up to 2 GiB) or encoding per step above that: for caption sets too large for memory. Needs a frozen encoder and captions fixed per image."""


@dataclass
class DiffusionConfig:
    objective: Literal["ddpm", "flow_matching"] = "ddpm"
    """Training objective (docs/objectives.md): 'ddpm' draws discrete timesteps and trains the prediction_type target; 'flow_matching' (rectified flow, SD3 / Flux) trains the velocity noise - x0 on x_t = (1 - sigma) x0 + sigma noise, from scratch only, and samples with the flow samplers (euler, heun, dpm++, unipc)."""
    num_train_timesteps: int = 1000
    """Discrete diffusion timesteps of the training schedule."""
    beta_schedule: BetaSchedule = "linear"
    """Noise schedule: 'linear' (DDPM), 'scaled_linear' (Stable Diffusion) or 'squaredcos_cap_v2' (cosine, Nichol & Dhariwal)."""
    beta_start: float = 0.0001
    """First beta of linear / scaled_linear schedules."""
    beta_end: float = 0.02
    """Last beta of linear / scaled_linear schedules."""
    prediction_type: PredictionType = "epsilon"
    """What the network predicts: noise, velocity (v) or the clean sample."""
    snr_gamma: Optional[float] = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the usual value, None disables it."""
    offset_noise: float = 0.0
    """Scale of per-channel offset noise added to the noise (0 disables it)."""
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    """Flow matching: density of the training times (SD3's names): uniform, logit-normal (logit_mean, logit_std) or mode (mode_scale)."""
    logit_mean: float = 0.0
    """Flow matching, timestep_sampling 'logit_normal': mean of logit(u)."""
    logit_std: float = 1.0
    """Flow matching, timestep_sampling 'logit_normal': standard deviation of logit(u)."""
    mode_scale: float = 1.29
    """Flow matching, timestep_sampling 'mode': SD3's scale s (in [-1, 2 / (pi - 2)]; 0 is uniform)."""
    flow_shift: float = 1.0
    """Flow matching: static shift of the sigmas, sigma -> shift * sigma / (1 + (shift - 1) * sigma) (more time at high noise when > 1); exported as the scheduler's `shift`."""
    flow_shift_by_resolution: bool = False
    """Flow matching: the shift follows the sample size as in Flux / SD3: exp(mu), mu linear in the token count (side / 2)^2 from 0.5 at 256 to 1.15 at 4096 tokens (replaces flow_shift; exported as a static shift)."""
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow matching: SD3's per-example loss weighting (diffusers' compute_loss_weighting_for_sd3): none, sigma_sqrt (sigma^-2) or cosmap."""


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None
    """Optimizer steps to train; set this or `num_epochs`."""
    num_epochs: Optional[int] = None
    """Passes over the data; converted to steps once the data size is known."""
    batch_size: int = 16
    """Images per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; global batch = batch_size x this x processes."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    """diffusers LR schedule after `lr_warmup_steps` of linear warm-up."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear LR warm-up."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """'adamw' (torch's AdamW) or 'adamw_8bit' (bitsandbytes' AdamW8bit: optimizer state in 8 bits, about a quarter of AdamW's memory for the state; needs a CUDA GPU and `pip install bitsandbytes`, refused otherwise before any model loads)."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping norm; None disables clipping."""
    nonfinite_max_skips: int = 3
    """Consecutive steps with a non-finite loss or gradient that are skipped (never applied) before rolling back to the newest checkpoint."""
    nonfinite_max_rollbacks: int = 2
    """Rollbacks (each with a remedy, see nonfinite_remedy) before a run whose steps stay non-finite stops with a message; 0 stops where the first rollback would be."""
    nonfinite_remedy: Literal["auto", "lower_lr", "raise_precision"] = "auto"
    """What a rollback changes: 'raise_precision' (fp16 -> bf16 -> fp32, then the learning rate), 'lower_lr', or 'auto' (precision while mixed precision is on, else the learning rate)."""
    nonfinite_lr_factor: float = 0.5
    """Learning-rate multiplier of each 'lower_lr' rollback (applied to the rest of the schedule)."""
    mixed_precision: MixedPrecision = "auto"
    """'auto' (fp32 or mixed precision, whichever a short probe of this model on this device finds faster; see docs/performance.md), 'bf16' (CPU or recent GPU), 'fp16' (CUDA only) or 'no' (fp32)."""
    channels_last: bool = False
    """Keep the UNet's weights and activations in channels_last memory format. Measured slower for diffusers UNets (GroupNorm) on an H100 in bf16 (0.65x at batch 128) and on CPU; for other models and devices, measure (docs/performance.md)."""
    gradient_checkpointing: bool = False
    """Recompute the trained networks' activations in the backward pass instead of keeping them (the UNet or transformer and any trained text encoder): less memory for about a third more step time, same loss and gradients."""
    compile: bool = False
    """torch.compile the UNet in place: fuses the normalisation, activation and cast kernels (1.65x for the butterflies UNet on an H100), but the first step waits for compilation (~100 s there) and each new input shape compiles again."""
    seed: int = 0
    """Seeds weight init, data order, flips, noise and timesteps (each step is a pure function of seed and step)."""
    use_ema: bool = True
    """Keep an exponential moving average of the weights; samples and export use it."""
    ema_decay: float = 0.9999
    """Upper bound of the EMA decay; with `ema_warmup` the decay ramps up towards it."""
    ema_warmup: bool = True
    """Ramp the EMA decay up as 1 - (1 + step)^(-2/3) so early averages are not dominated by the init."""
    condition_dropout: float = 0.1
    """Probability of replacing a class label by the null class, or a caption by the empty prompt (trains the unconditional branch)."""
    log_every_steps: int = 10
    """Steps between loss/LR/images-per-second logs (TensorBoard, metrics.jsonl, progress bar)."""
    checkpoint_every_steps: Optional[int] = 500
    """Steps between training-state checkpoints (one is always written at the end)."""
    checkpoint_every_epochs: Optional[int] = None
    """Alternative to checkpoint_every_steps, in passes over the data."""
    checkpoints_total_limit: Optional[int] = 3
    """Keep at most this many training-state checkpoints; None keeps all."""
    checkpoint_on_signal: bool = True
    """On SIGTERM (preemption) or Ctrl-C, finish the step under way and write a checkpoint of it before stopping (exit 143 / 130); false stops after the step without one."""
    sample_every_steps: Optional[int] = 500
    """Steps between sample grids from fixed seeds (one is always written at the end)."""
    sample_every_epochs: Optional[int] = None
    """Alternative to sample_every_steps, in passes over the data (the tutorial's save_image_epochs)."""
    push_to_hub: bool = False
    """Upload the exported folder to the Hugging Face hub when training ends."""
    hub_model_id: Optional[str] = None
    """Hub repository, e.g. 'you/ddpm-butterflies-128'."""
    hub_private: bool = False
    """Create the hub repository as private."""
    eval_every_steps: Optional[int] = None
    """Steps between sample-quality evaluations (FID/KID, classifier accuracy and FID) during training; None disables them."""
    eval_num_samples: int = 100
    """Samples per evaluation during training."""
    eval_num_reference: int = 1000
    """Training images whose Inception features are the FID/KID reference (computed once, cached)."""
    eval_inception: bool = True
    """Include Inception FID/KID in evaluations during training (False: classifier metrics only, much cheaper on CPU)."""
    keep_best_by: Optional[Literal["fid", "kid", "classifier_fid", "accuracy"]] = None
    """Keep the export with the best value of this evaluation metric in OUTPUT_DIR/best (needs eval_every_steps)."""
    prior_preservation: bool = False
    """DreamBooth: add the prior-preservation loss on class images (needs data.class_prompt and a base model)."""
    prior_loss_weight: float = 1.0
    """DreamBooth: loss = instance_loss + prior_loss_weight * prior_loss."""


@dataclass
class SampleConfig:
    scheduler: SchedulerName = "dpm++"
    """Sampler for preview grids and the default of `difftrain sample`."""
    num_inference_steps: int = 25
    """Sampler steps."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale; 1.0 means no guidance."""
    num_images: int = 16
    """Images in an unconditional preview grid."""
    images_per_class: int = 8
    """Columns of a class-conditional or text preview grid (one row per class or prompt)."""
    prompts: list = field(default_factory=list)
    """Prompts of text preview grids; empty uses up to 10 distinct training captions."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of guidance ('' = the empty prompt the model was trained with)."""
    seed: int = 0
    """First seed of the preview grid (image i uses seed + i)."""
    batch_size: int = 64
    """Images per sampler forward pass."""


@dataclass
class RunConfig:
    output_dir: str = "runs/run"
    """Run directory: pipeline export, checkpoints, samples, logs. An existing run there is resumed."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_labels(self) -> bool:
        """Whether the data's labels are used: class conditioning, or captions made from labels."""
        m = self.model
        return m.conditioning == "class" or (m.conditioning == "text" and bool(self.data.caption_template))


class ConfigError(ValueError):
    """All problems found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")
