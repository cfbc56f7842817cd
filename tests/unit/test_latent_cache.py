"""Latent distributions in the disk cache (vae.cache_latents_to_disk): bit for bit the RAM cache's draws, per bucket and
with flips, reused without running the VAE encoder, keyed by the VAE's weights and the images; the config refuses it
where nothing would be cached."""

from __future__ import annotations

import pytest
import torch

from difftrain.config import ConfigError, VaeConfig, load_config
from difftrain.data.batches import MicroBatch
from difftrain.families.latents import LatentEncoder
from difftrain.models.vae import build_scratch_vae


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))


def _tiny_vae(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_scratch_vae(VaeConfig(block_out_channels=[8, 16], latent_channels=4), 3, 16).eval()


def _images(n: int, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _encoder_calls(vae: torch.nn.Module) -> tuple[list, object]:
    calls: list = []
    return calls, vae.encoder.register_forward_hook(lambda *args: calls.append(1))


def _stores(tmp_path) -> list:
    folder = tmp_path / "cache" / "latents"
    return sorted(p.name for p in folder.glob("[0-9a-f]*")) if folder.is_dir() else []


@pytest.mark.parametrize("flip", [False, True])
def test_disk_latent_cache_draws_the_ram_cache_bits_and_is_reused(tmp_path, flip):
    vae = _tiny_vae()
    images = _images(70)  # more than one encoder batch (64)
    ram = LatentEncoder(vae, 0.5, images, random_flip=flip, cache=True)
    disk = LatentEncoder(vae, 0.5, images, random_flip=flip, cache=True, disk=True)
    assert disk.reused is False and disk.params.device.type == "cpu"
    assert torch.equal(disk.params, ram.params)
    for step in range(3):
        rows = torch.randint(0, 70, (9,), generator=torch.Generator().manual_seed(step))
        micro = MicroBatch(rows, images[rows])
        a = ram.draw_with_mask(micro, torch.Generator().manual_seed(step))
        b = disk.draw_with_mask(micro, torch.Generator().manual_seed(step))
        assert torch.equal(a[0], b[0]) and a[0].stride() == b[0].stride()  # strides too: see LatentEncoder.layouts
        assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])

    calls, hook = _encoder_calls(vae)
    again = LatentEncoder(vae, 0.5, images, random_flip=flip, cache=True, disk=True)
    hook.remove()
    assert calls == [] and again.reused is True and again.store_folder == disk.store_folder
    assert torch.equal(again.params, ram.params)
    assert len(_stores(tmp_path)) == 1


def test_bucketed_disk_latent_cache_draws_the_ram_cache_bits(tmp_path):
    vae = _tiny_vae()
    buckets = [_images(5, 16, 32, seed=1), _images(3, 32, 16, seed=2), _images(4, 16, 16, seed=3)]
    row_bucket = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    row_slot = torch.cat([torch.arange(5), torch.arange(3), torch.arange(4)])
    ram = LatentEncoder(vae, 0.5, buckets, True, True, (row_bucket, row_slot))
    disk = LatentEncoder(vae, 0.5, buckets, True, True, (row_bucket, row_slot), disk=True)
    assert [tuple(p.shape) for p in disk.bucket_params] == [(10, 8, 8, 16), (6, 8, 16, 8), (8, 8, 8, 8)]
    for rows in ([0, 4, 4, 2], [6, 5], [11, 8, 9]):
        rows = torch.tensor(rows)
        bucket, slots = row_bucket[rows[0]], row_slot[rows]
        micro = MicroBatch(rows, buckets[bucket][slots])
        a, _, fa = ram.draw_with_mask(micro, torch.Generator().manual_seed(int(rows[0])))
        b, _, fb = disk.draw_with_mask(micro, torch.Generator().manual_seed(int(rows[0])))
        assert torch.equal(a, b) and a.stride() == b.stride() and torch.equal(fa, fb)
    calls, hook = _encoder_calls(vae)
    LatentEncoder(vae, 0.5, buckets, True, True, (row_bucket, row_slot), disk=True)
    hook.remove()
    assert calls == []


def test_a_changed_vae_weight_image_or_setting_gets_its_own_store(tmp_path):
    vae, images = _tiny_vae(), _images(6)
    first = LatentEncoder(vae, 0.5, images, True, True, disk=True)
    with torch.no_grad():
        vae.encoder.conv_in.weight.view(-1)[0] += 1e-6  # one weight, by one ulp-ish step
    changed_vae = LatentEncoder(vae, 0.5, images, True, True, disk=True)
    other = images.clone()
    other[3, 1, 7, 2] ^= 1  # one pixel's lowest bit
    changed_image = LatentEncoder(vae, 0.5, other, True, True, disk=True)
    no_flip = LatentEncoder(vae, 0.5, other, False, True, disk=True)
    folders = {e.store_folder for e in (first, changed_vae, changed_image, no_flip)}
    assert len(folders) == 4 and not any(e.reused for e in (first, changed_vae, changed_image, no_flip))
    assert len(_stores(tmp_path)) == 4
    # the scale is applied when drawing, not cached: another scaling factor reuses the store
    assert LatentEncoder(vae, 0.25, other, False, True, disk=True).reused is True


def test_a_vae_in_another_dtype_gets_its_own_store():
    vae, images = _tiny_vae(), _images(4)
    a = LatentEncoder(vae, 0.5, images, False, True, disk=True)
    b = LatentEncoder(vae.to(torch.bfloat16), 0.5, images, False, True, disk=True)
    assert a.store_folder != b.store_folder and not b.reused


@pytest.mark.parametrize("preset, overrides, fragment", [
    ("tiny/digits-text", [], "needs 'model.space' = 'latent' or 'model.pretrained'"),
    ("tiny/mini-sd", ["vae.cache_latents=false"], "needs 'vae.cache_latents' = true"),
])
def test_cache_latents_to_disk_where_nothing_is_cached_is_refused(preset, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(preset, ["vae.cache_latents_to_disk=true", *overrides])
    assert fragment in str(info.value)


def test_cache_latents_to_disk_on_a_latent_run_is_accepted():
    assert load_config("tiny/mini-sd", ["vae.cache_latents_to_disk=true"]).vae.cache_latents_to_disk
    assert load_config("dreambooth-lora", ["model.pretrained=runs/sd", "data.instance_dir=photos",
                                           "vae.cache_latents_to_disk=true"]).vae.cache_latents_to_disk
