"""Dataset index: what navil-preprocess wrote (docs/data_format.md), as compact numpy arrays.

A dataset directory holds `manifest.json` (written last: its presence means the dataset is
complete) and, per shard, a tar plus `*.index.json` with every member's byte offset, the image
sizes after EXIF orientation and the text token count. Everything a pack planner needs is read
here once, without opening a tar; samples are then read by offset (`ShardReader`).

Token counts: `text_tokens` are trusted only when the manifest's tokenizer hash equals ours
and (for conversations) the manifest's chat template equals our chat style; otherwise they are
recounted from each sample's JSON with `count_sample_tokens` (logged: slow on big data).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_navil.data.chat_template import CHAT_ENCODING_VERSION, count_sample_tokens
from megatron_navil.errors import UserError
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

KINDS = ("caption", "conversation", "interleaved", "text")
"""Sample kinds, in the order of their int8 codes in `DatasetIndex.kind`."""


class DataError(UserError, ValueError):
    """A dataset the loader cannot use; the message names the path and what to do."""


@dataclass
class DatasetIndex:
    """All samples of one dataset directory; arrays are indexed by sample (or image) number."""

    root: str
    tars: list[str]
    """Absolute tar path per shard."""
    keys: list[str]
    kind: np.ndarray
    """int8 [n]: index into KINDS."""
    shard: np.ndarray
    """int32 [n]: shard of each sample (index into `tars`)."""
    json_offset: np.ndarray
    """int64 [n]: byte offset of the sample's JSON member in its tar."""
    json_size: np.ndarray
    text_tokens: np.ndarray
    """int64 [n]: text token ids of the sample, images excluded (see data_format.md)."""
    image_start: np.ndarray
    """int64 [n + 1]: images of sample i are image rows image_start[i]:image_start[i+1]."""
    image_offset: np.ndarray
    image_size: np.ndarray
    image_height: np.ndarray
    image_width: np.ndarray
    image_member: list[str]
    fingerprint: str
    """Identity of the dataset (shard names, sizes, sample counts): a resumed run checks it."""

    def __len__(self) -> int:
        return len(self.keys)


def load_dataset(root: str, tokenizer, chat_style: str, recount: bool = True) -> DatasetIndex:
    """Read `root/manifest.json` and every shard index listed in it (in manifest order)."""
    root = os.path.abspath(root)
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise DataError(
            f"{root}: no manifest.json. Not a finished navil-preprocess output "
            "(the manifest is written when the last partition completes); point "
            "data paths at the preprocess --output directory"
        )
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format_version") != 1:
        raise DataError(
            f"{path}: format_version {manifest.get('format_version')!r}, this "
            "loader reads version 1"
        )
    tok_meta = manifest.get("tokenizer") or {}
    same_tok = tok_meta.get("model_sha256") is not None and tok_meta.get("model_sha256") == getattr(
        tokenizer, "sha256", None
    )
    settings = manifest.get("settings", {})
    same_style = (
        settings.get("chat_template") == chat_style
        and settings.get("chat_encoding", 1) == CHAT_ENCODING_VERSION
    )
    cols: dict[str, list] = {
        k: []
        for k in (
            "kind",
            "shard",
            "json_offset",
            "json_size",
            "text_tokens",
            "num_images",
            "image_offset",
            "image_size",
            "image_height",
            "image_width",
        )
    }
    keys, members, tars = [], [], []
    ident = hashlib.sha256()
    for s, entry in enumerate(manifest["shards"]):
        tars.append(os.path.join(root, entry["tar"]))
        ident.update(f"{entry['tar']}:{entry['num_samples']}:{entry['tar_bytes']};".encode())
        with open(os.path.join(root, entry["index"]), encoding="utf-8") as f:
            shard_index = json.load(f)
        for smp in shard_index["samples"]:
            keys.append(smp["key"])
            cols["kind"].append(KINDS.index(smp["kind"]))
            cols["shard"].append(s)
            off, size = smp["members"]["json"]
            cols["json_offset"].append(off)
            cols["json_size"].append(size)
            t = smp.get("text_tokens")
            cols["text_tokens"].append(-1 if t is None else t)
            cols["num_images"].append(len(smp["images"]))
            for im in smp["images"]:
                off, size = smp["members"][im["member"]]
                cols["image_offset"].append(off)
                cols["image_size"].append(size)
                cols["image_height"].append(im["height"])
                cols["image_width"].append(im["width"])
                members.append(im["member"])
    n_img = np.asarray(cols["num_images"], dtype=np.int64)
    ds = DatasetIndex(
        root=root,
        tars=tars,
        keys=keys,
        kind=np.asarray(cols["kind"], dtype=np.int8),
        shard=np.asarray(cols["shard"], dtype=np.int32),
        json_offset=np.asarray(cols["json_offset"], dtype=np.int64),
        json_size=np.asarray(cols["json_size"], dtype=np.int64),
        text_tokens=np.asarray(cols["text_tokens"], dtype=np.int64),
        image_start=np.concatenate([[0], np.cumsum(n_img)]).astype(np.int64),
        image_offset=np.asarray(cols["image_offset"], dtype=np.int64),
        image_size=np.asarray(cols["image_size"], dtype=np.int64),
        image_height=np.asarray(cols["image_height"], dtype=np.int32),
        image_width=np.asarray(cols["image_width"], dtype=np.int32),
        image_member=members,
        fingerprint=ident.hexdigest()[:16],
    )
    if len(ds) == 0:
        raise DataError(f"{root}: the dataset has no samples")
    stale = np.zeros(len(ds), dtype=bool) if same_tok else np.ones(len(ds), dtype=bool)
    if not same_style:  # only conversations depend on the chat template
        stale |= ds.kind == KINDS.index("conversation")
    if stale.any():
        theirs = settings.get("chat_template")
        why = (
            "its index was made with another tokenizer (manifest tokenizer hash differs or "
            "is missing)"
            if not same_tok
            else f"its conversations were counted with chat template {theirs!r}, not {chat_style!r}"
            if theirs != chat_style
            else f"its conversations were counted with chat encoding version "
            f"{settings.get('chat_encoding', 1)}, this loader uses {CHAT_ENCODING_VERSION} "
            "(whole-string tokenization)"
        )
        if not recount:
            raise DataError(
                f"{root}: {why}; re-run navil-preprocess with this tokenizer/"
                "template or set data.recount_tokens: true"
            )
        log.warning(
            "%s: %s; recounting %d samples' text tokens from their JSON",
            root,
            why,
            int(stale.sum()),
        )
        _recount(ds, np.nonzero(stale)[0], tokenizer, chat_style)
    return ds


def _recount(ds: DatasetIndex, rows: np.ndarray, tokenizer, chat_style: str) -> None:
    with ShardReader(ds.tars) as reader:
        for i in rows:
            doc = json.loads(
                reader.read(int(ds.shard[i]), int(ds.json_offset[i]), int(ds.json_size[i]))
            )
            ds.text_tokens[i] = count_sample_tokens(tokenizer, doc, chat_style)


class ShardReader:
    """Reads byte ranges of shard tars with os.pread through a small cache of open files."""

    def __init__(self, tars: list[str], max_open: int = 64):
        self.tars, self.max_open = tars, max_open
        self._fds: "OrderedDict[int, int]" = OrderedDict()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.tars[shard], os.O_RDONLY)
            self._fds[shard] = fd
            if len(self._fds) > self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(
                f"{self.tars[shard]}: short read at {offset} ({len(data)} of {size} "
                "bytes); the shard is truncated"
            )
        return data

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def blended_fingerprint(datasets: list[DatasetIndex], extra: Optional[dict] = None) -> str:
    """Identity of a list of datasets plus the settings that shape the plan."""
    h = hashlib.sha256()
    for ds in datasets:
        h.update(ds.fingerprint.encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]
