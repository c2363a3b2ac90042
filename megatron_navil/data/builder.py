"""Planned pack -> NaViLBatch: read by offset, lay out tokens, decode images, collate.

Per sample: read its JSON, size its images (the same ImageSizer the planner used), lay out its
tokens with `layout.image_token_ids` of exactly those grids (samples.py), check the length
equals the planned one, truncate if the plan says so (never inside an image; images after the
cut are not decoded). Then all images of the pack are decoded in one DALI call. A sample whose
JSON or any image fails (storage garbage that slipped past preprocessing, a tar member that is
not the regular file its index names, an image header over the pixel limit) is dropped whole,
so the pack's token layout always matches the images it carries; each failing image is counted
and logged once per key. Samples the index refused (columns.REFUSALS) never get here: the planner
skips them, and the builder logs each key once when its skip is handed out (with the detail
costs.py recomputes for it; duplicates marked by navil-dedup are counted, not logged).
Collation follows megatron_navil/batch.py:
- labels[t] = tokens[t+1] inside a sample; pad_id at a sample's last position and on padding;
- loss_mask[t] = 1 iff tokens[t+1] is a training target of the sample (samples.py), so a
  sample's last position, image tokens, user turns and padding get 0;
- position_ids restart at 0 per sample; padding to seq_length is a final "sample" (loss 0).
With `pack_metadata` (data.host_pack_metadata) the pack's host-side metadata (pack_meta.py) is
computed here too, so the model reads nothing back from the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from megatron_navil.batch import NaViLBatch
from megatron_navil.config.model import NaViLModelConfig
from megatron_navil.data.columns import REFUSALS
from megatron_navil.data.costs import CostModel
from megatron_navil.data.decode import (
    DaliImageDecoder,
    DecodeFailure,
    ImageJob,
    normalize_pixels,
)
from megatron_navil.data.index import DatasetIndex, FdCache, ShardReader
from megatron_navil.data.layout import image_token_ids
from megatron_navil.data.members import UnsafeMember
from megatron_navil.data.planner import PlannedPack
from megatron_navil.data.samples import SampleTokens, build_sample_tokens
from megatron_navil.data.sizing import ImageSizer
from megatron_navil.pack_meta import PackMeta
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class _Sample:
    key: str
    tokens: SampleTokens
    jobs: list[ImageJob] = field(default_factory=list)
    image_names: list[str] = field(default_factory=list)
    pixels: list[torch.Tensor] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)


class Datasets:
    """Several DatasetIndex objects addressed by one global sample id; their readers share one
    cache of open tar files (hundreds of datasets never hold more than `max_open`)."""

    def __init__(self, datasets: list[DatasetIndex], max_open: int = 64):
        self.items = datasets
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])]).astype(np.int64)
        self.files = FdCache(max_open)
        self.readers = [ShardReader(d.tars, self.files) for d in datasets]

    def locate(self, gid: int) -> tuple[int, int]:
        d = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return d, gid - int(self.offsets[d])

    def close(self) -> None:
        self.files.close()


class PackBuilder:
    """Turns a planned pack (global sample ids) into a NaViLBatch: reads the samples, decodes and
    patchifies their images at the planned scales, tokenises the text with the image tokens in
    place, pads to seq_length. Skips and truncations are recorded in the batch metadata."""

    def __init__(
        self,
        datasets: Datasets,
        costs: CostModel,
        sizer: ImageSizer,
        decoder: DaliImageDecoder,
        cfg: NaViLModelConfig,
        tokenizer,
        chat_style: str,
        add_bos: bool,
        seq_length: int,
        pixel_dtype: torch.dtype = torch.float32,
        pack_metadata: bool = True,
    ):
        self.data, self.costs, self.sizer = datasets, costs, sizer
        self.decoder, self.cfg, self.tok = decoder, cfg, tokenizer
        self.chat_style, self.add_bos, self.seq_length = chat_style, add_bos, seq_length
        self.pad_id, self.pixel_dtype = tokenizer.pad_id, pixel_dtype
        self.pack_metadata = pack_metadata  # data.host_pack_metadata
        self._logged: set[str] = set()

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(msg, *args)

    def _prepare(self, gid: int, planned: int, truncate: bool) -> Optional[_Sample]:
        d, i = self.data.locate(gid)
        ds, reader = self.data.items[d], self.data.readers[d]
        key = ds.key(i)
        shard = int(ds.shard[i])
        rows = range(int(ds.image_start[i]), int(ds.image_start[i + 1]))
        scales = [self.sizer.scales(int(ds.image_height[r]), int(ds.image_width[r])) for r in rows]
        img_ids = [image_token_ids(self.cfg, [s.grid for s in sc]) for sc in scales]
        try:
            raw = reader.read_member(
                shard, int(ds.json_offset[i]), int(ds.json_size[i]), f"{key}.json"
            )
        except UnsafeMember as e:
            self._warn_once(key, "sample %s refused, skipped: %s", key, e)
            return None
        try:  # garbage where the JSON should be (storage, a mismatched index) skips the sample
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("key") != key:
                raise ValueError(f"the JSON at the index's offset is not sample {key}'s")
            tokens = build_sample_tokens(doc, img_ids, self.tok, self.chat_style, self.add_bos)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._warn_once(
                key, "sample %s (%s): unreadable JSON, skipped: %s", key, ds.tars[shard], e
            )
            return None
        if len(tokens.ids) != planned:
            raise RuntimeError(
                f"sample {key} of {ds.root} has {len(tokens.ids)} tokens but its index implies "
                f"{planned}: the index's text_tokens were counted with "
                "another tokenizer or template. Re-run navil-preprocess with this tokenizer"
            )
        kept = tokens.truncate(self.seq_length) if truncate else len(rows)
        s = _Sample(key, tokens)
        for r, sc in list(zip(rows, scales))[:kept]:
            name = f"{key}.{ds.image_member(r)}"
            try:
                data = reader.read_member(
                    shard, int(ds.image_offset[r]), int(ds.image_size[r]), name
                )
            except UnsafeMember as e:
                self._warn_once(key, "sample %s refused, skipped: %s", key, e)
                return None
            s.jobs.append(ImageJob(data, int(ds.image_height[r]), int(ds.image_width[r]), sc))
            s.image_names.append(name)
        return s

    def _log_refusals(self, pack: PlannedPack) -> None:
        """Name each sample the index refused (planned as a skip) once, with the reason."""
        for gid, reason in pack.skipped:
            if reason in REFUSALS and reason != "duplicate":
                d, i = self.data.locate(gid)
                ds = self.data.items[d]
                key = ds.key(i)
                if key in self._logged:
                    continue
                detail = self.costs.why(gid)  # recomputed only for a first log line
                self._warn_once(
                    key, "sample %s of %s refused (%s: %s), skipped", key, ds.root, reason, detail
                )

    def build(self, pack: PlannedPack) -> NaViLBatch:
        stats = {
            "skipped_samples": len(pack.skipped),
            "truncated_samples": len(pack.truncated),
            "skipped_images": 0,
            "corrupt_samples": 0,
        }
        self._log_refusals(pack)
        truncated = set(pack.truncated)
        samples = []
        for gid, planned in zip(pack.samples, pack.lengths):
            s = self._prepare(gid, planned, gid in truncated)
            if s is None:
                stats["corrupt_samples"] += 1
            else:
                samples.append(s)
        jobs = [j for s in samples for j in s.jobs]
        results = iter(self.decoder.decode(jobs)) if jobs else iter(())
        kept = []
        for s in samples:
            ok = True
            for name, res in zip(s.image_names, [next(results) for _ in s.jobs]):
                if isinstance(res, DecodeFailure):
                    ok = False
                    stats["skipped_images"] += 1
                    self._warn_once(
                        name,
                        "image %s %s at training time; its sample is skipped (%s)",
                        name,
                        "refused" if res.refused else "failed to decode",
                        res.reason,
                    )
                else:
                    s.pixels.extend(res)  # its scales, smallest first
            if ok:
                s.grids = [sc.grid for j in s.jobs for sc in j.scales]
                kept.append(s)
            else:
                stats["corrupt_samples"] += 1
        return self._collate(kept, stats)

    def _collate(self, samples: list[_Sample], stats: dict) -> NaViLBatch:
        tokens, labels, loss, pos, lens = [], [], [], [], []
        for s in samples:
            ids, target = s.tokens.ids, s.tokens.target
            tokens += ids
            labels += ids[1:] + [self.pad_id]
            loss += target[1:] + [0]
            pos += range(len(ids))
            lens.append(len(ids))
        used = len(tokens)
        if used > self.seq_length:
            raise RuntimeError(f"pack of {used} tokens exceeds seq_length {self.seq_length}")
        pad = self.seq_length - used
        if pad:  # the padding "sample": fixed T for the pipeline schedules, no loss
            tokens += [self.pad_id] * pad
            labels += [self.pad_id] * pad
            loss += [0] * pad
            pos += range(pad)
            lens.append(pad)
        t = torch.tensor(tokens, dtype=torch.long)
        pixels = [p for s in samples for p in s.pixels]
        grids = [(1, h, w) for s in samples for h, w in s.grids]
        stats.update(
            samples=len(samples),
            tokens=used,
            padding_tokens=pad,
            loss_tokens=int(sum(loss)),
            images=sum(len(s.jobs) for s in samples),
            keys=[s.key for s in samples],
        )
        # one uint8 concat + one float pass for the whole pack; on the GPU path these run on
        # the caller's current stream (the loader's private one, cuda_handoff.py), like the
        # decoder's allocations, so the whole pack is ordered on one stream
        pixel_values = normalize_pixels(torch.cat(pixels), self.pixel_dtype) if pixels else None
        batch = NaViLBatch(
            tokens=t,
            labels=torch.tensor(labels, dtype=torch.long),
            loss_mask=torch.tensor(loss, dtype=torch.float32),
            position_ids=torch.tensor(pos, dtype=torch.long),
            cu_seqlens=torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32),
            pixel_values=pixel_values,
            grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
            modality_mask=self.cfg.visual_token_mask(t),
            metadata=stats,
        )
        if self.pack_metadata:  # here, on the CPU in the loader thread, not in the model
            batch.pack_meta = PackMeta.build(self.cfg, batch)
        return batch
