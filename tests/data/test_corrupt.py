"""Images (and JSON) that go bad after preprocessing are skipped at training time, not fatal.

A copy of the test shards is damaged in place (same byte lengths, so every offset in the index
stays valid, as when storage returns garbage): one caption image overwritten with random bytes
(no JPEG/PNG/WebP header: refused before it reaches DALI), the second image of the two-image
interleaved sample replaced by a smaller valid JPEG padded with zeros (decodes, but not to the
size the index planned from), and one sample's JSON overwritten with random bytes. Proves: over
two epochs exactly those three samples never reach a batch while every other sample does, each
epoch; counters say 2 skipped images and 3 corrupt samples per epoch; each bad image/JSON is
logged once in total, not once per epoch; every batch still satisfies the contract (its
<IMG_CONTEXT> count matches the images that remain); resume stays exact with the damage in
place.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from tests.data.corpus import all_index_samples, epochs, jpeg_bytes, photo
from tests.data.test_resume import assert_same_batch


def _overwrite(root: str, sample: dict, member: str, data: bytes) -> None:
    off, size = sample["members"][member]
    assert len(data) == size
    part, seg, _ = sample["key"].split("-")  # keys are p{partition}-{segment}-{n}
    tar = f"shard-{part}-{seg}.tar"
    with open(os.path.join(root, tar), "r+b") as f:
        f.seek(off)
        f.write(data)


def _damage(src: str, dst: str) -> dict[str, str]:
    shutil.copytree(src, dst)
    samples = all_index_samples(dst)
    rng = np.random.default_rng(0)
    caption = next(s for s in samples if s["kind"] == "caption")
    member = caption["images"][0]["member"]
    _overwrite(
        dst,
        caption,
        member,
        rng.integers(0, 256, caption["members"][member][1], dtype=np.uint8).tobytes(),
    )
    inter = next(s for s in samples if s["kind"] == "interleaved")
    member = inter["images"][1]["member"]
    small = jpeg_bytes(photo("rocket", (40, 24)))
    size = inter["members"][member][1]
    assert len(small) < size
    _overwrite(dst, inter, member, small + bytes(size - len(small)))
    text = next(s for s in samples if s["kind"] == "text")
    _overwrite(
        dst,
        text,
        "json",
        rng.integers(0, 256, text["members"]["json"][1], dtype=np.uint8).tobytes(),
    )
    return {caption["key"]: "image", inter["key"]: "image", text["key"]: "json"}


def test_bad_images_are_skipped_counted_and_logged_once(
    dataset, make_loader, tmp_path, cfg, navil_logs
):
    root = str(tmp_path / "damaged")
    bad = _damage(dataset.root, root)
    all_keys = {s["key"] for s in all_index_samples(root)}
    loader = make_loader([root], seq_length=256)
    batches, counters = epochs(loader, 2)
    ctx = cfg.special_token_id("<IMG_CONTEXT>")
    for epoch in (0, 1):
        keys = [k for b in batches if b.metadata["epoch"] == epoch for k in b.metadata["keys"]]
        assert sorted(keys) == sorted(all_keys - set(bad))
    for b in batches:
        b.validate(cfg)
        g = b.grid_thw
        n_ctx = 0 if g is None else int((g[:, 1] // 2 * (g[:, 2] // 2)).sum())
        assert int((b.tokens == ctx).sum()) == n_ctx
    assert counters["skipped_images"] == 4 and counters["corrupt_samples"] == 6
    warnings = [r.getMessage() for r in navil_logs.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings
    assert sum("refused at training time" in w and "not a JPEG" in w for w in warnings) == 1
    assert sum("failed to decode" in w and "differs from the index" in w for w in warnings) == 1
    assert sum("unreadable JSON" in w for w in warnings) == 1

    resumed = make_loader([root], seq_length=256)
    state_loader = make_loader([root], seq_length=256)
    for _ in range(3):
        next(state_loader)
    resumed.load_state_dict(state_loader.state_dict())
    for i in range(3, 8):
        assert_same_batch(next(resumed), batches[i])
