"""Readers of streamed shards: webdataset-style tar files and parquet row groups, with random access.

A tar shard is indexed by one pass over its headers (tarfile seeks over member data, it does not read it);
a sample is then one seek + read per member. A parquet file's pieces are its row groups, counted from the
footer. Both read through an fsspec file system, so a local folder and a hub repo (HfFileSystem, seekable over
HTTP) go through the same code.

`index_tar` / `index_parquet` give a shard's start-up record (sample count per piece, and the distinct labels
when labels are wanted); `TarReader` / `ParquetReader` read samples in whichever process needs them.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has more than one
# webdataset's key rule (webdataset.tariterators.base_plus_ext): the key is the member name up to the first '.'
# of its basename (directories kept), the extension is the rest.
_KEY_RULE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class ColumnError(ValueError):
    """A parquet shard without a configured column: the user's setting is wrong, not the shard."""


def split_member_name(name: str) -> Optional[tuple[str, str]]:
    """(key, lower-case extension) of a tar member name by webdataset's rule, or None for a name without one."""
    match = _KEY_RULE.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


@dataclass
class TarSample:
    key: str
    members: dict[str, tuple[int, int]] = field(default_factory=dict)
    """extension -> (offset of the data in the tar, size in bytes)."""

    @property
    def image_ext(self) -> Optional[str]:
        return next((ext for ext in IMAGE_EXTENSIONS if ext in self.members), None)


def scan_tar(fileobj: Any) -> list[TarSample]:
    """The samples (members grouped by key, in order of first appearance) of a tar that have an image."""
    import tarfile

    samples: dict[str, TarSample] = {}
    end = fileobj.seek(0, 2)
    fileobj.seek(0)
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:  # plain tar only: compressed tars cannot seek
        for info in tar:
            if not info.isfile():
                continue
            if info.offset_data + info.size > end:  # tarfile only notices a cut in the last member's data later
                raise tarfile.ReadError(f"truncated: member {info.name} ends at byte {info.offset_data + info.size}"
                                        f" of a {end}-byte file")
            split = split_member_name(info.name)
            if split is None:
                continue
            key, ext = split
            samples.setdefault(key, TarSample(key)).members[ext] = (info.offset_data, info.size)
    return [s for s in samples.values() if s.image_ext is not None]


def _read(fileobj: Any, where: tuple[int, int]) -> bytes:
    fileobj.seek(where[0])
    data = fileobj.read(where[1])
    if len(data) != where[1]:
        raise OSError(f"short read: {len(data)} of {where[1]} bytes at offset {where[0]}")
    return data


def tar_label(fileobj: Any, sample: TarSample) -> Optional[int]:
    """The sample's integer label: `cls` text, else `json` {"label": int}; None when it has neither."""
    if "cls" in sample.members:
        return int(_read(fileobj, sample.members["cls"]).decode().strip())
    if "json" in sample.members:
        label = json.loads(_read(fileobj, sample.members["json"])).get("label")
        return None if label is None else int(label)
    return None


def tar_caption(fileobj: Any, sample: TarSample) -> Optional[str]:
    """The sample's caption: `txt`, else `json` "caption"; None when it has neither."""
    if "txt" in sample.members:
        return _read(fileobj, sample.members["txt"]).decode("utf-8").strip()
    if "json" in sample.members:
        caption = json.loads(_read(fileobj, sample.members["json"])).get("caption")
        return None if caption is None else str(caption)
    return None


def index_tar(fs: Any, path: str, want_labels: bool) -> dict:
    """Start-up record of a tar shard: {"pieces": [samples], "labels": distinct labels or None, "unlabelled": n}."""
    with fs.open(path, "rb") as f:
        samples = scan_tar(f)
        labels: Optional[set[int]] = None
        unlabelled = 0
        if want_labels:
            labels = set()
            for sample in samples:
                label = tar_label(f, sample)
                if label is None:
                    unlabelled += 1
                else:
                    labels.add(label)
    return {"pieces": [len(samples)], "labels": None if labels is None else sorted(labels),
            "unlabelled": unlabelled, "class_names": None}


def hf_class_names(schema: Any, column: str) -> Optional[list[str]]:
    """ClassLabel names of `column` from the `datasets` features stored in a parquet schema, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
    return None if names is None else [str(n) for n in names]


def index_parquet(fs: Any, path: str, image_column: str, label_column: Optional[str]) -> dict:
    """Start-up record of a parquet file: one piece per row group (sample counts from the footer); with
    `label_column`, its ClassLabel names, or else its distinct values (reading that column alone)."""
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        for role, column in (("image", image_column), ("label", label_column)):
            if column is not None and column not in names:
                setting = "data.image_column" if role == "image" else "data.label_column"
                raise ColumnError(f"parquet file {path} has no {role} column {column!r} ({setting}); columns: {names}")
        pieces = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        labels: Optional[list[int]] = None
        unlabelled = 0
        class_names = None
        if label_column is not None:
            class_names = hf_class_names(pf.schema_arrow, label_column)
            distinct: set[int] = set()
            for g in range(len(pieces)):
                column = pf.read_row_group(g, columns=[label_column]).column(0)
                unlabelled += column.null_count
                distinct.update(int(v) for v in column.unique().drop_null().to_pylist())
            labels = sorted(distinct)
    return {"pieces": pieces, "labels": labels, "unlabelled": unlabelled, "class_names": class_names}


class LastUsed(OrderedDict):
    """The last `size` readers or row groups of this process (a shard is indexed / read when first needed)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or_make(self, key: Any, make: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            _, old = self.popitem(last=False)
            close = getattr(old, "close", None)
            if close is not None:
                close()
        return value


class TarReader:
    """One tar shard, indexed when opened, read a sample at a time (seek + read)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.path = path
        self.file = fs.open(path, "rb")
        try:
            self.samples = scan_tar(self.file)
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def key(self, index: int) -> str:
        return self.samples[index].key

    def image_bytes(self, index: int) -> bytes:
        sample = self.samples[index]
        return _read(self.file, sample.members[sample.image_ext])

    def label(self, index: int) -> Optional[int]:
        return tar_label(self.file, self.samples[index])

    def caption(self, index: int) -> Optional[str]:
        return tar_caption(self.file, self.samples[index])


class ParquetReader:
    """One parquet file; `rows(group)` reads a row group's image (and label/caption) columns."""

    def __init__(self, fs: Any, path: str, image_column: str, label_column: Optional[str],
                 caption_column: Optional[str]) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.file = fs.open(path, "rb")
        self.parquet = pq.ParquetFile(self.file)
        self.columns = {"image": image_column, "label": label_column, "caption": caption_column}
        self.groups = LastUsed(2)

    def close(self) -> None:
        self.file.close()

    def row_offset(self, group: int) -> int:
        return sum(self.parquet.metadata.row_group(g).num_rows for g in range(group))

    def rows(self, group: int, role: str) -> list:
        """The row group's values of one column ('image', 'label' or 'caption'); None when not configured."""
        def read() -> dict:
            wanted = {r: c for r, c in self.columns.items() if c is not None}
            table = self.parquet.read_row_group(group, columns=sorted(set(wanted.values())))
            return {r: table.column(c) for r, c in wanted.items()}

        return self.groups.get_or_make(group, read).get(role)

    def image_bytes(self, group: int, index: int) -> bytes:
        value = self.rows(group, "image")[index].as_py()
        if isinstance(value, dict):  # a `datasets` Image: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                with open(value["path"], "rb") as f:
                    return f.read()
            raise ValueError("image struct has neither bytes nor path")
        if value is None:
            raise ValueError("image is null")
        return bytes(value)

    def label(self, group: int, index: int) -> Optional[int]:
        column = self.rows(group, "label")
        value = None if column is None else column[index].as_py()
        return None if value is None else int(value)

    def caption(self, group: int, index: int) -> Optional[str]:
        column = self.rows(group, "caption")
        value = None if column is None else column[index].as_py()
        return None if value is None else str(value)


def label_lookup(raw_labels: list[int], class_names: Optional[list[str]]) -> tuple[list[str], Optional[dict[int, int]]]:
    """(class names, raw label -> class index, or None when the labels already are the class indices).

    With ClassLabel names the labels are indices already; otherwise the distinct integers, in numeric order,
    become the classes (as for an in-memory `datasets` set), so labels 3, 7, 9 train as classes 0, 1, 2.
    """
    if class_names is not None:
        return class_names, None
    names = [str(v) for v in raw_labels]
    if raw_labels == list(range(len(raw_labels))):
        return names, None
    return names, {raw: i for i, raw in enumerate(raw_labels)}
