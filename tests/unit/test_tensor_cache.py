"""The on-disk tensor cache (data/tensor_cache.py): round trip, reuse, interrupted and killed builds, one builder, keys.

Each test gets its own cache root (DIFFTRAIN_CACHE = a fresh tmp folder), so nothing is shared between tests.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from difftrain.data.tensor_cache import (TensorWriter, cached_store, module_fingerprint, open_store, store_key,
                                         strings_digest)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFTRAIN_CACHE", str(tmp_path / "cache"))


def _values(rows: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"latents/32x48": torch.randn(rows, 4, 4, 6, generator=g),
            "half": torch.randn(rows, 3, generator=g).to(torch.bfloat16),
            "rows/32x48": torch.arange(rows, dtype=torch.int64) * 7}


def _builder(values: dict[str, torch.Tensor], calls: list, chunk: int = 3, fail_at: int | None = None):
    def build(writer: TensorWriter) -> None:
        calls.append(1)
        for name, tensor in values.items():
            writer.create(name, tensor.shape, tensor.dtype)
            for start in range(0, len(tensor), chunk):
                if fail_at is not None and start >= fail_at:
                    raise KeyboardInterrupt  # as if the build were interrupted mid-way
                writer.write(name, start, tensor[start:start + chunk])
        writer.meta["scale"] = 0.5
    return build


def _mapped(tensor: torch.Tensor, folder: Path) -> bool:
    """Whether the tensor's memory lies in a mapping of a file of `folder` (Linux /proc/self/maps)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return len(fields) > 5 and fields[5].startswith(str(folder))
    return False


def test_store_round_trips_memory_mapped_and_is_reused(tmp_path):
    values, calls = _values(), []
    parts = {"vae": "abc", "resolution": 32}
    store = cached_store("latents", parts, _builder(values, calls), estimate_bytes=4096, what="test latents")
    assert calls == [1] and store.meta == {"scale": 0.5}
    assert store.folder == tmp_path / "cache" / "latents" / store_key("latents", parts)
    for name, tensor in values.items():
        assert store[name].dtype == tensor.dtype and torch.equal(store[name], tensor)
    if Path("/proc/self/maps").is_file():
        assert _mapped(store["latents/32x48"], store.folder)
    again = cached_store("latents", parts, _builder(values, calls), estimate_bytes=4096, what="test latents")
    assert calls == [1]  # reused: the build function did not run again
    assert torch.equal(again["latents/32x48"], values["latents/32x48"])
    other = cached_store("latents", {**parts, "resolution": 64}, _builder(values, calls), estimate_bytes=4096,
                         what="test latents")
    assert calls == [1, 1] and other.folder != store.folder


def test_an_interrupted_build_leaves_no_cache_and_the_next_one_completes(tmp_path):
    values, calls = _values(), []
    with pytest.raises(KeyboardInterrupt):
        cached_store("latents", {"k": 1}, _builder(values, calls, fail_at=6), estimate_bytes=4096, what="test")
    kind_dir = tmp_path / "cache" / "latents"
    assert open_store("latents", store_key("latents", {"k": 1})) is None
    assert [p.name for p in kind_dir.iterdir() if not p.name.endswith(".lock")] == []  # temporary removed
    store = cached_store("latents", {"k": 1}, _builder(values, calls), estimate_bytes=4096, what="test")
    assert calls == [1, 1] and torch.equal(store["rows/32x48"], values["rows/32x48"])


def test_a_killed_build_process_leaves_no_cache_and_the_next_one_cleans_up(tmp_path):
    script = textwrap.dedent("""
        import os, torch
        from difftrain.data.tensor_cache import cached_store
        def build(writer):
            writer.create("x", (10, 3))
            writer.write("x", 0, torch.ones(5, 3))
            os._exit(9)  # killed mid-build: no cleanup runs
        cached_store("latents", {"k": 2}, build, estimate_bytes=1024, what="test")
    """)
    env = {"DIFFTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr
    kind_dir = tmp_path / "cache" / "latents"
    assert any(p.name.startswith(".") and ".tmp-" in p.name for p in kind_dir.iterdir())  # its half-written folder
    assert open_store("latents", store_key("latents", {"k": 2})) is None

    def build(writer: TensorWriter) -> None:
        writer.put("x", torch.full((10, 3), 2.0))

    store = cached_store("latents", {"k": 2}, build, estimate_bytes=1024, what="test")
    assert torch.equal(store["x"], torch.full((10, 3), 2.0))
    assert not any(".tmp-" in p.name for p in kind_dir.iterdir())


def test_a_build_that_skips_rows_is_refused():
    def build(writer: TensorWriter) -> None:
        writer.create("x", (10, 3))
        writer.write("x", 0, torch.ones(9, 3))

    with pytest.raises(RuntimeError, match="rows not written"):
        cached_store("latents", {"k": 3}, build, estimate_bytes=1024, what="test")
    assert open_store("latents", store_key("latents", {"k": 3})) is None


def test_a_truncated_store_is_built_again():
    calls: list = []
    store = cached_store("latents", {"k": 4}, _builder(_values(), calls), estimate_bytes=4096, what="test")
    file = next(store.folder.glob("0.npy"))
    del store
    file.write_bytes(file.read_bytes()[:200])
    store = cached_store("latents", {"k": 4}, _builder(_values(), calls), estimate_bytes=4096, what="test")
    assert calls == [1, 1] and torch.equal(store["latents/32x48"], _values()["latents/32x48"])


def test_processes_that_miss_together_build_once():
    calls: list = []
    results: list = []

    def build(writer: TensorWriter) -> None:
        calls.append(1)
        time.sleep(0.3)  # the others arrive while this one builds
        writer.put("x", torch.arange(6.0).reshape(3, 2))

    def one() -> None:  # each thread opens the lock file itself, so flock excludes them as it does processes
        results.append(cached_store("latents", {"k": 5}, build, estimate_bytes=1024, what="test")["x"].sum().item())

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and results == [15.0, 15.0, 15.0]


def _module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))


def test_keys_follow_the_weights_and_the_texts():
    encoder, same, other = _module(0), _module(0), _module(1)
    assert module_fingerprint(encoder) == module_fingerprint(same) != module_fingerprint(other)
    with torch.no_grad():
        list(same.parameters())[-1].view(-1)[3] += 1e-6
    assert module_fingerprint(same) != module_fingerprint(encoder)
    assert module_fingerprint(encoder.to(torch.bfloat16)) != module_fingerprint(_module(0))
    assert strings_digest(["a", "bc"]) != strings_digest(["ab", "c"]) != strings_digest(["a", "bc", ""])
    assert store_key("t", {"a": 1, "b": [1, 2]}) == store_key("t", {"b": [1, 2], "a": 1}) != store_key("u", {"a": 1, "b": [1, 2]})


def test_a_builder_that_loses_the_rename_uses_the_winners_store():
    """Without working locks (some network file systems) two builders may race; the second keeps the first's."""
    from difftrain.data.tensor_cache import store_folder

    key = store_key("latents", {"k": 6})

    def build(writer: TensorWriter) -> None:
        winner = store_folder("latents", key)  # another process finishes first, while this one builds
        winner.mkdir()
        other = TensorWriter(winner)
        other.put("x", torch.ones(2, 2))
        other._finish(key, "latents", {"k": 6})
        writer.put("x", torch.ones(2, 2))

    store = cached_store("latents", {"k": 6}, build, estimate_bytes=1024, what="test")
    assert torch.equal(store["x"], torch.ones(2, 2))
    assert not any(".tmp-" in p.name for p in store.folder.parent.iterdir())


def test_rows_digest_follows_every_byte_the_shape_and_the_order():
    from difftrain.data.tensor_cache import rows_digest

    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    small = 3 * 48  # three rows a chunk: several chunks, the last one short
    assert rows_digest(images, small) == rows_digest(images.clone(), small)
    changed = images.clone()
    changed[9, 2, 3, 3] ^= 1
    assert rows_digest(changed, small) != rows_digest(images, small)
    assert rows_digest(images[[1, 0, *range(2, 10)]], small) != rows_digest(images, small)
    assert rows_digest(images.reshape(10, 3, 2, 8), small) != rows_digest(images, small)
    assert rows_digest(images[:9], small) != rows_digest(images, small)
