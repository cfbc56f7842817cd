"""What an image folder holds, from one pass that keeps no list of its files: the warm start of the disk cache.

A built cache is found by a hash of its source. For an image folder that hash is order-independent (a sum of
per-file hashes), so a streaming pass over the folder (`summarize_folder`, which cannot sort what it does not
keep) and the sorted listing that builds the cache (`fingerprint_source`) give the same value. A warm start then
costs one `os.scandir` and one stat per file, and memory independent of the number of files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from difftrain.data.sources import folder_prefix, link_target, mixed_layout_error, scan_entries

MODULUS = 1 << 256


def item_value(relative_path: str, stat: Any) -> int:
    """One file's term of the sum: sha256 of its path under the folder, size and mtime, as an integer; `stat` is
    a callable returning the file's os.stat_result (a file gone since it was listed has neither)."""
    try:
        st = stat()
        line = f"{relative_path}\t{st.st_size}\t{st.st_mtime_ns}"
    except OSError:
        line = f"{relative_path}\t-"
    return int.from_bytes(hashlib.sha256(line.encode()).digest(), "big")


class FolderFingerprint:
    """An order-independent hash of a folder's images: each one's path under the folder, size and mtime, summed
    per class folder (None: the flat layout), then the classes in label order."""

    def __init__(self) -> None:
        self.sums: dict[Optional[str], int] = {}
        self.counts: dict[Optional[str], int] = {}

    def add(self, class_name: Optional[str], total: int, count: int) -> None:
        """Add `count` files whose `item_value`s sum to `total`."""
        self.sums[class_name] = (self.sums.get(class_name, 0) + total) % MODULUS
        self.counts[class_name] = self.counts.get(class_name, 0) + count

    def hexdigest(self, class_names: list[str]) -> str:
        order = class_names if class_names else [None]
        return hashlib.sha256(json.dumps([(c, self.counts.get(c, 0), self.sums.get(c, 0)) for c in order])
                              .encode()).hexdigest()


@dataclass
class FolderSummary:
    description: str
    count: int
    fingerprint: str
    class_names: list[str] = field(default_factory=list)
    dangling_links: list[tuple[str, str]] = field(default_factory=list)


def _walk(folder: str, class_name: Optional[str], prefix: str, fingerprint: FolderFingerprint,
          links: list[tuple[str, str]], subdirs: Optional[list[str]]) -> int:
    """Add `folder`'s images to `fingerprint`; collects its dangling links and (if asked) subfolders; returns
    how many images it holds (sources.scan_entries decides what counts, as for the listing)."""
    base = folder_prefix(folder)
    count = total = 0
    for kind, entry in scan_entries(folder):
        if kind == "dir":
            if subdirs is not None:
                subdirs.append(entry.name)
        elif kind == "image":
            total += item_value(prefix + entry.name, entry.stat)
            count += 1
        else:
            links.append((base + entry.name, link_target(base + entry.name)))
    fingerprint.add(class_name, total, count)
    return count


def summarize_folder(folder: Path) -> Optional[FolderSummary]:
    """The folder source `folder` would give, summarised (None when it has no images: the listing path then
    says what is wrong); raises the listing's ValueError for a folder with both layouts."""
    fingerprint = FolderFingerprint()
    root_links: list[tuple[str, str]] = []
    subdirs: list[str] = []
    text = str(folder)
    flat = _walk(text, None, "", fingerprint, root_links, subdirs)
    base = folder_prefix(text)
    subdirs.sort()
    counts, links = {}, sorted(root_links)
    for d in subdirs:
        sub_links: list[tuple[str, str]] = []
        counts[d] = _walk(base + d, d, d + os.sep, fingerprint, sub_links, None)
        links += sorted(sub_links)
    class_dirs = [d for d in subdirs if counts[d]]
    if flat and class_dirs:
        raise mixed_layout_error(folder, class_dirs)
    if flat:
        return FolderSummary(f"image folder {folder}", flat, fingerprint.hexdigest([]), [], sorted(root_links))
    if not class_dirs:
        return None
    return FolderSummary(f"class folders {folder} ({len(class_dirs)} classes)", sum(counts.values()),
                         fingerprint.hexdigest(class_dirs), class_dirs, links)


def fingerprint_source(source: Any) -> Optional[str]:
    """The same hash as `summarize_folder` for a folder source's sorted listing (None for other sources)."""
    if getattr(source, "root", None) is None or not source.names:
        return None
    base = folder_prefix(str(source.root))
    fingerprint = FolderFingerprint()
    for i, name in enumerate(source.names):
        class_name = None if source.labels is None else source.class_names[source.labels[i]]
        fingerprint.add(class_name, item_value(name[len(base):], lambda: os.stat(name)), 1)
    return fingerprint.hexdigest(list(source.class_names))
