"""Data at scale: the decoded-data disk cache and streamed tar shards against the in-RAM path, on generated image
folders of two sizes.

For each size (10k and 100k 16 px PNGs by default, made here, and the same PNGs as webdataset tar shards of 1,000)
it trains the tiny unconditional UNet for a few steps through `difftrain train`, each a fresh process:
  - disk, cold: the set over the memory budget (data.max_memory_gb), decoded into an empty cache folder;
  - disk, warm: the same again, reusing that cache;
  - RAM: the default budget, the whole set decoded into memory;
  - stream, cold / warm: the tar shards, streamed (cold counts the shards' samples; warm reuses the counts);
and prints the cache build's images/s, launch-to-first-step seconds (from the run's log), the loader's images/s
(data/loader.py with its CPU default of one worker process, measured here alone) next to the step's images/s,
and each run's peak RSS (largest process). A second table is the disk path alone, in a fresh process per size:
opening the built cache (the part of a warm start that grows with the set: one pass over the folder for the key)
and reading one whole epoch through `gather`, each with the RSS it added.

    python benchmarks/data_scale.py --sizes 10000,100000 --work /tmp/data-scale
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tarfile
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, run_difftrain, steady_images_per_s  # noqa: E402
from machine import describe_machine  # noqa: E402

RESOLUTION = 16
SHARD_IMAGES = 1000
LOADER_MICRO_BATCHES = 400
STEPS = 30
BATCH = 16


def make_folder(folder: Path, count: int) -> Path:
    """`count` distinct 16 px RGB PNGs (a gradient and a per-image colour) in one flat folder (unconditional)."""
    marker = folder / f".complete-{count}"
    if marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, RESOLUTION, dtype=np.float32)[None, :, None]
    for i in range(count):
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3).astype(np.float32)
        pixels = np.clip(0.5 * ramp + 0.5 * colour[None, None, :], 0, 255).astype(np.uint8)
        Image.fromarray(np.broadcast_to(pixels, (RESOLUTION, RESOLUTION, 3)).copy()).save(folder / f"{i:06d}.png")
    marker.touch()
    return folder


def overrides(folder: Path, cache: Path, disk: bool) -> list[str]:
    budget = ["data.max_memory_gb=1.0e-6"] if disk else []
    return [f"data.path={folder}", f"data.cache_dir={cache}", f"data.resolution={RESOLUTION}", "data.channels=3",
            "data.random_flip=false", f"train.max_steps={STEPS}", f"train.batch_size={BATCH}",
            "train.gradient_accumulation_steps=1", "train.log_every_steps=5", "train.sample_every_steps=null",
            "train.checkpoint_every_steps=null", "sample.num_images=1", "sample.num_inference_steps=1", *budget]


def first_step_seconds(run: Path) -> float:
    log = run.with_suffix(".log")  # the command's output: the data is decoded before train.log exists
    match = re.search(r"first step starts ([0-9.]+) s after launch", log.read_text())
    if match is None:
        raise RuntimeError(f"{log} does not say when the first step started")
    return float(match.group(1))


def cache_build_images_per_s(run: Path) -> float:
    log = run.with_suffix(".log")
    match = re.search(r"decoded data: (\d+) images into .* in ([0-9.]+) s", log.read_text())
    if match is None:
        raise RuntimeError(f"{log} does not report a cache build")
    return int(match.group(1)) / max(float(match.group(2)), 0.1)


def make_shards(folder: Path, shards: Path, per_shard: int = SHARD_IMAGES) -> Path:
    """The folder's PNGs as webdataset tar shards (KEY.png), `per_shard` images each."""
    marker = shards / ".complete"
    if marker.is_file():
        return shards
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    files = sorted(folder.glob("*.png"))
    for at in range(0, len(files), per_shard):
        with tarfile.open(shards / f"shard-{at // per_shard:05d}.tar", "w") as tar:
            for path in files[at:at + per_shard]:
                tar.add(path, arcname=path.name)
    marker.touch()
    return shards


def loader_images_per_s(path: Path, cache: Path, disk: bool) -> float:
    """Micro-batches handed out by the training loader (data/loader.py) with its CPU default of one worker
    process: rows gathered from the disk cache, or decoded from the streamed shards."""
    from difftrain.config import load_config
    from difftrain.data.dataset import load_image_dataset
    from difftrain.data.loader import BatchLoader
    from difftrain.data.streaming import open_streaming_set

    cfg = load_config("tiny/folder-uncond", overrides(path, cache, disk))
    data = open_streaming_set(cfg.data, want_labels=False) or load_image_dataset(cfg.data, want_labels=False)
    slots = LOADER_MICRO_BATCHES + 8
    loader = BatchLoader(data, lambda position, size: data.rows(len(data), 0, position, size),
                         lambda slot: slot * BATCH, BATCH, end_slot=slots, workers=1)
    try:
        for slot in range(8):  # the worker's start and first reads
            loader.get(slot)
        start, count = time.perf_counter(), 0
        for slot in range(8, slots):
            count += int(loader.get(slot).images.shape[0])
        return count / (time.perf_counter() - start)
    finally:
        loader.close()


def epoch_child(folder: Path, cache: Path) -> None:
    """In a fresh process: open the built cache, then gather one epoch in batches of 64; prints seconds and
    the RSS each part added (MiB; the current RSS, as the peak is the imports') as JSON."""
    from difftrain.config import load_config
    from difftrain.data.dataset import load_image_dataset

    def rss_mib() -> float:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    cfg = load_config("tiny/folder-uncond", overrides(folder, cache, disk=True))
    before, start = rss_mib(), time.perf_counter()
    data = load_image_dataset(cfg.data, want_labels=False)
    opened, open_seconds = rss_mib(), time.perf_counter() - start
    start = time.perf_counter()
    for position in range(0, len(data), 64):
        data.gather(data.rows(len(data), 0, position, 64))
    print(json.dumps({"open_s": open_seconds, "open_mib": opened - before, "epoch_s": time.perf_counter() - start,
                      "epoch_mib": rss_mib() - opened}))


def disk_path_row(size: int, folder: Path, cache: Path) -> list:
    done = subprocess.run([sys.executable, __file__, "--epoch-child", str(folder), str(cache)], check=True,
                          capture_output=True, text=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return [size, got["open_s"], got["open_mib"], got["epoch_s"], got["epoch_mib"]]


def import_seconds() -> float:
    """Launch to the training loop's module imported, in a fresh process: the part of launch-to-step-1 that does not
    depend on the data (torch, diffusers and what they import)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import difftrain.training.loop"], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--work", type=Path, default=Path("/tmp/difftrain-data-scale"))
    parser.add_argument("--epoch-child", nargs=2, type=Path, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epoch_child:
        epoch_child(*args.epoch_child)
        return
    print(describe_machine())
    imports = [import_seconds() for _ in range(3)]
    print(f"python -c 'import difftrain.training.loop': {min(imports):.1f} s (fastest of 3; {', '.join(f'{s:.1f}' for s in imports)})")
    rows, disk_rows = [], []
    for size in (int(s) for s in args.sizes.split(",")):
        folder = make_folder(args.work / f"images-{size}", size)
        cache = args.work / f"cache-{size}"
        shutil.rmtree(cache, ignore_errors=True)
        shards = make_shards(folder, args.work / f"shards-{size}")
        runs = {}
        for name, path, disk in (("disk, cold", folder, True), ("disk, warm", folder, True), ("RAM", folder, False),
                                 ("stream, cold", shards, False), ("stream, warm", shards, False)):
            out = args.work / f"run-{size}-{name.replace(', ', '-')}"
            runs[name] = (out, run_difftrain("tiny/folder-uncond", out, overrides(path, cache, disk)))
        loaders = {"disk": loader_images_per_s(folder, cache, True), "stream": loader_images_per_s(shards, cache, False)}
        disk_rows.append(disk_path_row(size, folder, cache))
        build = cache_build_images_per_s(runs["disk, cold"][0])
        for name, (out, result) in runs.items():
            kind = name.split(",")[0]
            rows.append([size, name, build if name == "disk, cold" else "-", first_step_seconds(out),
                         loaders.get(kind, "-"), steady_images_per_s(result["rows"], 5), result["peak_rss_mib"]])
    print(markdown_table(["images", "run", "cache build img/s", "launch to step 1 (s)", "loader img/s",
                          "step img/s", "peak RSS (MiB)"], rows))
    print()
    print(markdown_table(["images", "open built cache (s)", "RSS added (MiB)", "one epoch through gather (s)",
                          "RSS added (MiB)"], disk_rows))


if __name__ == "__main__":
    main()
