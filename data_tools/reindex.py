"""The binary index of a finished output (`index/`, docs/data_format.md "Binary index").

Two sources, one writer (megatron_navil.data.binindex.write_index):
- after the last partition finishes, navil-preprocess concatenates the per-shard pieces
  (`shard-*.cols.npy`) its partitions wrote when they committed each shard: no JSON is parsed
  again (a shard without a piece, e.g. from a run before pieces existed, is parsed from its
  index.json);
- `navil-preprocess --reindex DIR` rebuilds it from the JSON indexes alone, never reading a tar
  (outputs made before the binary index existed, or after an index.json was edited), with
  `--num-workers` processes parsing shards in parallel.
"""

from __future__ import annotations

import json
import os
import time
from typing import Iterator, Optional

from data_tools.cli_common import UsageError
from data_tools.parallel import ordered_map
from megatron_navil.data.binindex import INDEX_DIR, write_index
from megatron_navil.data.columns import Piece
from megatron_navil.data.index import DataError, json_pieces, shard_entries
from megatron_navil.utils.logging import get_logger

logger = get_logger(__name__)

PIECE_SUFFIX = ".cols.npy"
"""A committed shard's columns, next to its tar: `shard-p00000-000000.cols.npy`."""


def piece_path(out_dir: str, stem: str) -> str:
    return os.path.join(out_dir, stem + PIECE_SUFFIX)


def _manifest(root: str) -> tuple[str, dict]:
    path = os.path.join(root, "manifest.json")
    if not os.path.isfile(path):
        raise UsageError(
            f"{root}: no manifest.json; --reindex needs a finished navil-preprocess output"
        )
    with open(path, encoding="utf-8") as f:
        return path, json.load(f)


def _parse_shard(job: tuple[str, dict]) -> tuple[str, int, int, Piece]:
    root, entry = job
    ((tar, tar_bytes, num_samples, piece),) = json_pieces(root, {"shards": [entry]}, "")
    return tar, tar_bytes, num_samples, piece


def _noop() -> None:
    pass


def build_index(root: str, use_pieces: bool, num_workers: int = 0) -> dict:
    """Write `root/index/`; returns its meta.json content."""
    root = os.path.abspath(root)
    path, manifest = _manifest(root)
    try:
        entries = shard_entries(manifest, path)
    except DataError as e:
        raise UsageError(str(e)) from None
    t0 = time.monotonic()
    parsed = {"json": 0}

    def pieces() -> Iterator[tuple[str, int, int, Piece]]:
        todo: list[tuple[str, dict]] = []
        for entry in entries:
            stem = entry["tar"][: -len(".tar")] if entry["tar"].endswith(".tar") else None
            piece = Piece.load(piece_path(root, stem)) if use_pieces and stem else None
            if piece is not None and len(piece) == entry["num_samples"]:
                yield from _parsed(todo)
                todo = []
                yield entry["tar"], entry["tar_bytes"], entry["num_samples"], piece
            else:
                todo.append((root, entry))
        yield from _parsed(todo)

    def _parsed(todo: list) -> Iterator:
        parsed["json"] += len(todo)
        yield from ordered_map(_parse_shard, _noop, (), todo, num_workers if len(todo) > 1 else 0)

    meta = write_index(
        root, pieces(), path, manifest.get("settings") or {}, manifest.get("tokenizer")
    )
    logger.info(
        "%s: binary index of %d samples, %d images, %d shards (%d parsed from JSON) in %.1f s",
        os.path.join(root, INDEX_DIR),
        meta["num_samples"],
        meta["num_images"],
        meta["num_shards"],
        parsed["json"],
        time.monotonic() - t0,
    )
    return meta


def reindex_summary(meta: dict, root: str, seconds: Optional[float] = None) -> str:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    return (
        f"{os.path.join(os.path.abspath(root), INDEX_DIR)}: {meta['num_samples']} samples, "
        f"{meta['num_images']} images, {meta['num_shards']} shards{took} (binary index "
        f"version {meta['version']}, build {meta['build_id']})"
    )
