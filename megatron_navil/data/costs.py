"""Planning numbers of a window of samples, computed from the index columns when it is planned.

For global sample ids (any subset, typically one planner window) `CostModel.window` returns
aligned arrays: planned token length (sizing.py: image tokens from the indexed sizes, text tokens
from the index or recounted, BOS/EOS), image count, largest image's tokens and the refusal code
(columns.REFUSALS). All vectorised over the window; nothing is kept per sample of the corpus.

Refusals, first match wins (docs/data_loader.md, "Untrusted shards"):
- the entry's own code (a JSON entry that failed to parse, a non-string key: columns.py);
- malformed_entry: columns out of range (kind, shard, offsets before a header or past the tar's
  recorded size, negative sizes, image rows outside the image table, pixel sides < 1). A JSON
  index passes by construction; a binary one from elsewhere is checked here;
- unsafe_key, json_too_large (over the dataset's --max-json-bytes), unreadable_json (recount
  failed), implausible_tokens (limits.py), image_too_large (indexed pixels over the loader's
  limit, or more member bytes than such an image can have), image_unsizable (NaViL's resize rule
  refuses the indexed size), duplicate (marked by navil-dedup).
`why(gid)` recomputes one sample's reason with its detail for the log line naming its key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_navil.data.chat_template import count_sample_tokens
from megatron_navil.data.columns import KINDS, MAX_INT, REFUSALS
from megatron_navil.data.index import DatasetIndex, FdCache, ShardReader
from megatron_navil.data.limits import TOKEN_SLACK, max_image_bytes
from megatron_navil.data.members import HEADER_BYTES
from megatron_navil.data.sizing import ImageSizer
from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

CODE = {name: i for i, name in enumerate(REFUSALS)}
_KEY_BYTES = np.zeros(256, dtype=bool)
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-":
    _KEY_BYTES[_c] = True
_CONVERSATION = KINDS.index("conversation")
_FIELDS = (
    "length",
    "num_images",
    "max_image_tokens",
    "refused",
    "visual_tokens",
    "patches",
    "square_patches",
    "image_tokens",
)


@dataclass
class WindowCosts:
    """Per sample of a window (aligned with its ids)."""

    length: np.ndarray
    """int64: tokens of the whole sample as the builder lays it out."""
    num_images: np.ndarray
    """int64: images of the sample."""
    max_image_tokens: np.ndarray
    """int64: tokens of the sample's largest image (0 without images)."""
    refused: np.ndarray
    """int8: REFUSALS code (0: usable)."""
    visual_tokens: Optional[np.ndarray] = None
    """int64: tokens of the sample that go to the visual experts (<img> + <IMG_CONTEXT> of
    every image); None: not known (the planner then assumes no vision work)."""
    patches: Optional[np.ndarray] = None
    """int64: vision-encoder patches of all the sample's images (every scale)."""
    square_patches: Optional[np.ndarray] = None
    """float64: sum over the sample's images and scales of patches^2 (the encoder's
    bidirectional attention pairs)."""
    image_tokens: Optional[np.ndarray] = None
    """int64: tokens of all the sample's images (markers, line breaks included)."""

    def vision(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(visual_tokens, patches, square_patches, image_tokens), zeros where unknown."""
        k = len(self.length)
        zero = np.zeros(k, np.int64)
        return (
            zero if self.visual_tokens is None else self.visual_tokens,
            zero if self.patches is None else self.patches,
            zero.astype(np.float64) if self.square_patches is None else self.square_patches,
            zero if self.image_tokens is None else self.image_tokens,
        )


class CostModel:
    """Costs and refusals of global sample ids over several datasets (offsets: dataset d owns
    ids offsets[d]:offsets[d + 1])."""

    def __init__(
        self,
        datasets: list[DatasetIndex],
        sizer: ImageSizer,
        add_bos: bool,
        max_pixels: int,
        max_images: int,
        tokenizer=None,
        chat_style: str = "internlm2",
    ):
        self.datasets, self.sizer, self.add_bos = datasets, sizer, add_bos
        self.max_pixels, self.max_images = max_pixels, max_images
        self.tok, self.chat_style = tokenizer, chat_style
        self.offsets = np.concatenate([[0], np.cumsum([len(d) for d in datasets])]).astype(np.int64)
        self.max_scales = 1
        """Most scales of any image sized so far (grows as windows are planned)."""
        self._files = FdCache(8)
        self._readers = [ShardReader(d.tars, self._files) for d in datasets]
        self._recount_errors: dict[tuple[int, int], str] = {}
        self._reported: set[int] = set()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def close(self) -> None:
        self._files.close()

    def locate(self, gids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, gids, side="right") - 1

    def window(self, gids: np.ndarray) -> WindowCosts:
        gids = np.asarray(gids, dtype=np.int64)
        k = len(gids)
        out = WindowCosts(
            np.zeros(k, np.int64),
            np.zeros(k, np.int64),
            np.zeros(k, np.int64),
            np.zeros(k, np.int8),
            np.zeros(k, np.int64),
            np.zeros(k, np.int64),
            np.zeros(k, np.float64),
            np.zeros(k, np.int64),
        )
        where = self.locate(gids)
        for d in np.unique(where).tolist():
            sel = np.nonzero(where == d)[0]
            got = self._costs(d, gids[sel] - self.offsets[d])
            for f in _FIELDS:
                getattr(out, f)[sel] = getattr(got, f)
            self._report(d, got.refused)
        return out

    def why(self, gid: int) -> str:
        """The refusal detail of one sample ("" when it is not refused)."""
        d = int(self.locate(np.asarray([gid]))[0])
        i = gid - int(self.offsets[d])
        code = int(self._costs(d, np.asarray([i], dtype=np.int64)).refused[0])
        return _detail(self, d, i, REFUSALS[code]) if code else ""

    # ------------------------------------------------------------------ one dataset
    def _costs(self, d: int, i: np.ndarray) -> WindowCosts:
        ds = self.datasets[d]
        col = ds.cols.arrays
        kind = col["kind"][i].astype(np.int64)
        shard = col["shard"][i].astype(np.int64)
        jo, js = col["json_offset"][i], col["json_size"][i]
        tt = col["text_tokens"][i].astype(np.int64)
        a, b = col["image_start"][i], col["image_start"][i + 1]
        shard_ok = (shard >= 0) & (shard < ds.cols.num_shards)
        tar_bytes = col["shard_tar_bytes"][np.where(shard_ok, shard, 0)]
        bad = ~shard_ok | (kind < 0) | (kind >= len(KINDS)) | (tt < -1) | (tt >= MAX_INT)
        bad |= _span_bad(jo, js, tar_bytes) | (a < 0) | (b < a) | (b > ds.num_images)
        n_img = np.where(bad, 0, b - a)
        # image rows, for samples within the pack's image cap (the planner skips the others
        # without looking at their images: a lying count cannot make us gather 10^9 rows)
        take = np.nonzero(~bad & (n_img <= self.max_images))[0]
        owner = np.repeat(take, n_img[take])
        first = np.repeat(np.cumsum(n_img[take]) - n_img[take], n_img[take])
        rows = np.repeat(a[take], n_img[take]) + np.arange(len(owner)) - first
        io, isz = col["image_offset"][rows], col["image_size"][rows]
        ih, iw = col["image_height"][rows], col["image_width"][rows]
        img_bad = _span_bad(io, isz, tar_bytes[owner]) | (ih < 1) | (iw < 1)
        img_bad |= (ih >= MAX_INT) | (iw >= MAX_INT)
        bad[owner[img_bad]] = True

        code = col["entry_refused"][i].astype(np.int8)
        code[(code == 0) & bad] = CODE["malformed_entry"]
        code[(code == 0) & ~_keys_safe(ds, i)] = CODE["unsafe_key"]
        code[(code == 0) & (js > ds.json_limit)] = CODE["json_too_large"]
        stale = (code == 0) & (
            ds.recount_all | (ds.recount_conversations & (kind == _CONVERSATION))
        )
        for s in np.nonzero(stale)[0].tolist():
            t = self._recount(d, int(i[s]))
            if t is None:
                code[s] = CODE["unreadable_json"]
            else:
                tt[s] = t
        code[(code == 0) & ((tt < 0) | (tt > js + TOKEN_SLACK))] = CODE["implausible_tokens"]
        side = (ih > self.max_pixels) | (iw > self.max_pixels)  # before the product can overflow
        big = side | (np.where(side, 0, ih * iw) > self.max_pixels)
        big |= isz > max_image_bytes(self.max_pixels)
        _set(code, owner[big], CODE["image_too_large"])
        tokens, unsizable, vision = self._image_tokens(ih, iw, code[owner] == 0)
        _set(code, owner[unsizable], CODE["image_unsizable"])
        if ds.duplicate is not None:
            code[(code == 0) & (ds.duplicate[i] != 0)] = CODE["duplicate"]

        image_sum = np.bincount(owner, weights=tokens, minlength=len(i)).astype(np.int64)
        max_img = np.zeros(len(i), np.int64)
        np.maximum.at(max_img, owner, tokens)
        extra = (kind != _CONVERSATION).astype(np.int64) * (1 + int(self.add_bos))
        per_sample = [np.bincount(owner, weights=v, minlength=len(i)) for v in vision]
        return WindowCosts(
            tt + image_sum + extra,
            n_img.astype(np.int64),
            max_img,
            code,
            per_sample[0].astype(np.int64),
            per_sample[1].astype(np.int64),
            per_sample[2],
            image_sum,
        )

    def _image_tokens(self, h: np.ndarray, w: np.ndarray, live: np.ndarray):
        """Tokens per image row (0 for rows of refused samples), which rows NaViL's resize
        rule cannot size, and the rows' vision work (visual tokens, patches, patches^2 summed
        over scales: sizing.ImageSizer.vision); each distinct (h, w) is sized once."""
        tokens = np.zeros(len(h), np.int64)
        unsizable = np.zeros(len(h), bool)
        vision = (np.zeros(len(h), np.int64), np.zeros(len(h), np.int64), np.zeros(len(h)))
        rows = np.nonzero(live)[0]
        if not len(rows):
            return tokens, unsizable, vision
        uniq, inverse = np.unique(np.stack([h[rows], w[rows]], 1), axis=0, return_inverse=True)
        per, bad = np.zeros(len(uniq), np.int64), np.zeros(len(uniq), bool)
        work = np.zeros((len(uniq), 3))
        for u, (hh, ww) in enumerate(uniq.tolist()):
            try:
                per[u] = self.sizer.tokens(hh, ww)
                work[u] = self.sizer.vision(hh, ww)
                self.max_scales = max(self.max_scales, len(self.sizer.scales(hh, ww)))
            except ValueError:  # aspect ratio > 200
                bad[u] = True
        inverse = inverse.reshape(-1)
        tokens[rows], unsizable[rows] = per[inverse], bad[inverse]
        for v, col in zip(vision, work.T):
            v[rows] = col[inverse]
        return tokens, unsizable, vision

    def _recount(self, d: int, i: int) -> Optional[int]:
        ds = self.datasets[d]
        try:
            raw = self._readers[d].read_member(
                int(ds.shard[i]), int(ds.json_offset[i]), int(ds.json_size[i]), ds.key(i) + ".json"
            )
            return count_sample_tokens(self.tok, json.loads(raw), self.chat_style)
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:  # UnsafeMember
            self._recount_errors[(d, i)] = f"recounting its tokens: {e}"
            return None

    def _report(self, d: int, refused: np.ndarray) -> None:
        """One line per dataset the first time one of its windows has untrusted samples."""
        codes = np.bincount(refused, minlength=len(REFUSALS))
        codes[CODE["duplicate"]] = 0  # expected after navil-dedup: counted, not warned about
        if d in self._reported or not codes[1:].any():
            return
        self._reported.add(d)
        log.warning(
            "%s: %d samples refused as untrusted input in the first window that has any (%s; "
            "image limit %d px); refused samples are skipped, counted in skipped_samples and "
            "each key is logged once",
            self.datasets[d].root,
            int(codes[1:].sum()),
            ", ".join(f"{REFUSALS[c]}: {int(n)}" for c, n in enumerate(codes) if c and n),
            self.max_pixels,
        )


def _set(code: np.ndarray, rows: np.ndarray, value: int) -> None:
    rows = rows[code[rows] == 0]
    code[rows] = value


def _span_bad(offset: np.ndarray, size: np.ndarray, tar_bytes: np.ndarray) -> np.ndarray:
    """A member span that is not [header ... data] inside the tar's recorded size."""
    return (
        (offset < HEADER_BYTES)
        | (size < 0)
        | (offset >= MAX_INT)
        | (size >= MAX_INT)
        | (offset + size > tar_bytes)
    )


def _keys_safe(ds: DatasetIndex, i: np.ndarray) -> np.ndarray:
    """members.safe_key for each sample's key, vectorised over its bytes."""
    table = ds.cols.strings["keys"]
    off, data = table.offsets, table.data
    a, b = off[i], off[i + 1]
    n = b - a
    ok = (a >= 0) & (n >= 1) & (n <= 200) & (b <= len(data))
    take = np.nonzero(ok)[0]
    first = np.repeat(np.cumsum(n[take]) - n[take], n[take])
    pos = np.repeat(a[take], n[take]) + np.arange(int(n[take].sum())) - first
    good = _KEY_BYTES[np.asarray(data[pos], dtype=np.intp)]
    owner = np.repeat(take, n[take])
    bad_rows = np.unique(owner[~good])
    ok[bad_rows] = False
    return ok


def _detail(model: CostModel, d: int, i: int, reason: str) -> str:
    """The log detail of sample i of dataset d refused for `reason`."""
    ds = model.datasets[d]
    if reason in ("malformed_entry", "unsafe_key") and i in ds.cols.entry_detail:
        return ds.cols.entry_detail[i]
    size, t = int(ds.json_size[i]), int(ds.text_tokens[i])
    rows = range(int(ds.image_start[i]), int(ds.image_start[i + 1]))
    if reason == "malformed_entry":
        return "index entry: offsets, sizes or counts outside the shard and the index"
    if reason == "unsafe_key":
        return f"key {ds.key(i)!r} is not [A-Za-z0-9_-]"
    if reason == "json_too_large":
        return f"JSON member of {size} bytes > limit {ds.json_limit}"
    if reason == "unreadable_json":
        return model._recount_errors.get((d, i), "recounting its tokens failed")
    if reason == "implausible_tokens":
        return (
            f"the index gives {t} text tokens for a JSON member of {size} bytes "
            f"(at most {size} + {TOKEN_SLACK} are possible)"
        )
    if reason == "image_too_large":
        r = next(
            r
            for r in rows
            if int(ds.image_height[r]) * int(ds.image_width[r]) > model.max_pixels
            or int(ds.image_size[r]) > max_image_bytes(model.max_pixels)
        )
        return (
            f"image {ds.image_member(r)} is {int(ds.image_width[r])}x"
            f"{int(ds.image_height[r])} px, {int(ds.image_size[r])} bytes; the limit is "
            f"{model.max_pixels} px"
        )
    if reason == "image_unsizable":
        for r in rows:
            try:
                model.sizer.tokens(int(ds.image_height[r]), int(ds.image_width[r]))
            except ValueError as e:
                return str(e)
    if reason == "duplicate":
        return "marked as a copy of an earlier sample by navil-dedup"
    return reason
