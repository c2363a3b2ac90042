"""Per-record work done in the worker processes: parse, load + validate images, count tokens.

Kept free of job state so it runs the same in a spawned process or in-process
(`--num-workers 0`). Every failure of one record becomes a rejection of that record: the only
exceptions that escape are the ones that mean the whole job cannot go on (none by design).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from data_tools.images import ImageLimits, StoredImage, process_image
from data_tools.inputs import RawRecord
from data_tools.samples import Reject, parse_record
from data_tools.shards import SpoolRef


@dataclass
class WorkerConfig:
    """What every worker needs to process records (picklable)."""

    forced_format: Optional[str] = None
    """Sample kind forced by --format, or None to detect per record."""
    limits: ImageLimits = field(default_factory=ImageLimits)
    """Image validation limits."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or .model file for text token counts, or None."""
    chat_template: str = "internlm2"
    """Template style used to count conversation tokens."""


@dataclass
class Result:
    """Outcome of one record: either a sample ready to write or a rejection."""

    ordinal: int
    source: dict[str, Any]
    reason: Optional[str] = None
    """Rejection reason code (None when accepted)."""
    detail: str = ""
    content: Optional[dict[str, Any]] = None
    """kind + text/conversations (+ extra) of an accepted sample."""
    image_refs: list[str] = field(default_factory=list)
    images: list[StoredImage] = field(default_factory=list)
    text_tokens: Optional[int] = None
    digest: str = ""
    """Content hash (text + original image bytes) for --dedup."""
    spool: Optional[str] = None
    """The spool file of this result's chunk (its images' bytes are there)."""


_CFG: Optional[WorkerConfig] = None
_TOK = None


def init_worker(cfg: WorkerConfig) -> None:
    global _CFG, _TOK
    _CFG, _TOK = cfg, None
    if cfg.tokenizer:
        from megatron_navil.data.tokenizer import NaViLTokenizer

        _TOK = NaViLTokenizer.load(cfg.tokenizer)


def process_chunk(job: tuple[list[RawRecord], Optional[str]]) -> list[Result]:
    """Process a chunk; the accepted images' bytes go to the spool file (when given) and the
    results carry references to them, so only small objects travel back to the parent."""
    records, spool = job
    results = [process_record(r) for r in records]
    for r in results:
        r.spool = spool
    if spool is not None and any(r.reason is None and r.images for r in results):
        with open(spool, "wb") as f:
            for r in results:
                for im in r.images if r.reason is None else ():
                    offset = f.tell()
                    f.write(im.data)
                    im.data = SpoolRef(spool, offset, len(im.data))
    return results


def process_record(rec: RawRecord) -> Result:
    assert _CFG is not None, "init_worker was not called"
    res = Result(rec.ordinal, rec.source)
    try:
        if rec.error is not None:
            raise Reject(*rec.error)
        sample = parse_record(rec.line, rec.obj, rec.base_dir, _CFG.forced_format)
        res.images = [process_image(p, _CFG.limits) for p in sample.image_paths]
        res.image_refs = sample.image_refs
        res.content = sample.content_json()
        if sample.extra:
            res.content["extra"] = sample.extra
        if _TOK is not None:
            from megatron_navil.data.chat_template import count_sample_tokens

            res.text_tokens = count_sample_tokens(_TOK, res.content, _CFG.chat_template)
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(sample.content_json(), sort_keys=True, ensure_ascii=False).encode())
        for im in res.images:
            h.update(im.digest.encode())
        res.digest = h.hexdigest()
    except Reject as r:
        res.reason, res.detail = r.reason, r.detail
        res.images, res.content = [], None
    except Exception as e:  # a bug or an exotic file must cost one sample, not the job
        res.reason, res.detail = "internal_error", f"{type(e).__name__}: {e}"[:500]
        res.images, res.content = [], None
    return res
