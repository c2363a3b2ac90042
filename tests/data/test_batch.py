"""Batches from real shards obey megatron_navil/batch.py, sample by sample, and the model runs them.

For every sample of every pack over two epochs, the expected tokens and loss targets are rebuilt
independently: the sample's JSON is read with Python's `tarfile` (not the loader's offset
reader), image token runs come from the batch's own grid_thw rows, text from the tokenizer:
- caption: BOS, image, caption, EOS; loss on predicting the caption and EOS;
- text / interleaved: BOS, text with images in place of `<image>`, EOS; loss on text + EOS;
- conversation: `apply_chat_template` (InternLM2 style), loss on assistant turns only;
- truncated samples: a prefix of the above, cut to seq_length, never inside an image.
Then labels[t] = tokens[t+1] inside a sample, loss 0 at sample ends and on padding, position
ids restart per sample, the padding sample closes cu_seqlens at T, the modality mask is
<IMG_CONTEXT>|<img>, and pixel rows = sum of grid areas. Exact comparisons throughout.
A text-only dataset gives packs without pixel_values. Finally the Megatron NaViL model (debug
flavor, CPU) takes a loader batch: forward + backward with a finite loss equal to the plain
PyTorch reference's (same weights; tolerance as in tests/models: 2e-5 abs / 1e-4 rel).
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from megatron_navil.data.chat_template import apply_chat_template
from megatron_navil.data.layout import image_token_ids
from tests.data.corpus import epochs, preprocess

SEQ = 256


def _docs(root: str) -> dict[str, dict]:
    out = {}
    for name in sorted(os.listdir(root)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(root, name)) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        doc = json.load(tf.extractfile(m))
                        out[doc["key"]] = doc
    return out


def _expected(doc, images, tok, cfg):
    """(ids, target) of a whole sample; `images` = [[(h, w) per scale]] per image."""
    img = [image_token_ids(cfg, g) for g in images]
    if doc["kind"] == "conversation":
        enc = apply_chat_template(tok, doc["conversations"], style="internlm2", image_tokens=img)
        return enc.ids, enc.loss_mask
    ids, target = [tok.bos_id], [0]
    pieces = doc["text"].split("<image>")
    if doc["kind"] == "caption":
        ids += img[0]
        target += [0] * len(img[0])
        img = [[] for _ in pieces[1:]]
    for k, piece in enumerate(pieces):
        if k:
            ids += img[k - 1]
            target += [0] * len(img[k - 1])
        t = tok.encode(piece, allow_special=False) if piece else []
        ids += t
        target += [1] * len(t)
    return ids + [tok.eos_id], target + [1]


def _check_batch(batch, docs, tok, cfg):
    batch.validate(cfg)
    assert batch.tokens.shape == (SEQ,) and batch.cu_seqlens.dtype == torch.int32
    ctx = cfg.special_token_id("<IMG_CONTEXT>")
    assert torch.equal(
        batch.modality_mask, (batch.tokens == ctx) | (batch.tokens == cfg.special_token_id("<img>"))
    )
    cu = batch.cu_seqlens.tolist()
    keys = batch.metadata["keys"]
    assert len(cu) - 1 in (len(keys), len(keys) + 1) and cu[-1] == SEQ
    grids = [] if batch.grid_thw is None else [tuple(r[1:]) for r in batch.grid_thw.tolist()]
    g = 0
    for k, key in enumerate(keys):
        s, e = cu[k], cu[k + 1]
        toks = batch.tokens[s:e].tolist()
        doc = docs[key]
        n_img = len(doc["images"])
        # scales per image: each image's run between <img> and </img> has one frame break each
        frames = []
        start = cfg.special_token_id("<img>")
        for i, t in enumerate(toks):
            if t == start:
                end = toks.index(cfg.special_token_id("</img>"), i)
                frames.append(toks[i:end].count(cfg.special_token_id("<IMG_FRAME_BREAK>")))
        images = []
        for n in frames:
            images.append(grids[g : g + n])
            g += n
        if len(frames) < n_img:  # truncated: the dropped images are never decoded
            assert e - s <= SEQ
            images += [[(2, 2)]] * (n_img - len(frames))  # placeholders past the cut
        ids, target = _expected(doc, images, tok, cfg)
        assert toks == ids[: e - s], key
        assert e - s == len(ids) or (e - s <= SEQ and len(ids) > SEQ), key
        assert batch.position_ids[s:e].tolist() == list(range(e - s))
        assert batch.labels[s : e - 1].tolist() == toks[1:]
        assert batch.loss_mask[s:e].tolist() == [float(x) for x in target[1 : e - s]] + [0.0]
    assert g == len(grids)
    if len(cu) - 1 > len(keys):  # the padding sample
        assert batch.loss_mask[cu[-2] :].sum() == 0
        assert batch.position_ids[cu[-2] :].tolist() == list(range(SEQ - cu[-2]))
    if grids:
        assert batch.pixel_values.shape == (sum(h * w for h, w in grids), 3 * 16 * 16)
        assert batch.pixel_values.dtype == torch.float32
        assert float(batch.pixel_values.min()) >= -1 and float(batch.pixel_values.max()) <= 1
        assert sum(h // 2 * (w // 2) for h, w in grids) == int((batch.tokens == ctx).sum())
    else:
        assert batch.pixel_values is None and int((batch.tokens == ctx).sum()) == 0


def test_every_sample_matches_independent_layout(dataset, make_loader, tok, cfg):
    docs = _docs(dataset.root)
    loader = make_loader([dataset.root], seq_length=SEQ, overlong_policy="truncate")
    batches, c = epochs(loader, 2)
    seen = set()
    for batch in batches:
        _check_batch(batch, docs, tok, cfg)
        seen.update(batch.metadata["keys"])
    assert seen == set(docs)  # every sample (the over-long one truncated) was trained on
    assert c["truncated_samples"] == 2 and c["skipped_samples"] == 0  # 1 long text x 2 epochs
    assert c["tokens"] + c["padding_tokens"] == SEQ * c["batches"]


@pytest.mark.processes
def test_text_only_packs(tmp_path, tok_dir, make_loader, tok, cfg):
    root = preprocess(
        str(tmp_path),
        [{"text": f"plain text number {k} " * (1 + k % 7)} for k in range(30)],
        tok_dir,
    ).root
    docs = _docs(root)
    loader = make_loader([root], seq_length=SEQ)
    for _ in range(3):
        batch = next(loader)
        assert batch.pixel_values is None and batch.grid_thw is None
        _check_batch(batch, docs, tok, cfg)


def test_megatron_model_trains_on_loader_batch(megatron_single_process, dataset, make_loader, cfg):
    from megatron_navil.config import ParallelConfig, PrecisionConfig
    from megatron_navil.conversion import hf_to_megatron
    from megatron_navil.models.language import padded_vocab_size
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.reference import NaViLReference

    ref = NaViLReference(cfg).init_weights_(torch.Generator().manual_seed(0))
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig())
    padded = padded_vocab_size(cfg.llm.vocab_size, cfg.llm.make_vocab_size_divisible_by)
    model.load_state_dict(hf_to_megatron(ref.state_dict(), cfg, padded), strict=False)
    loader = make_loader([dataset.root], seq_length=SEQ)
    batch = next(loader)
    while batch.pixel_values is None:
        batch = next(loader)
    per_position = model(**batch.model_inputs())
    counted = (batch.loss_mask != 0) & (batch.tokens != cfg.img_context_id)
    loss = per_position.sum() / counted.sum()
    loss.backward()
    assert torch.isfinite(loss)
    ref_logits = ref(
        batch.tokens, batch.position_ids, batch.cu_seqlens, batch.pixel_values, batch.grid_thw
    )
    ref_loss = ref.loss(ref_logits, batch.labels, batch.loss_mask, input_ids=batch.tokens)
    torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["skip"])
def test_overlong_skip_is_counted(dataset, make_loader, policy):
    loader = make_loader([dataset.root], seq_length=SEQ, overlong_policy=policy)
    batches, c = epochs(loader, 1)
    keys = [k for b in batches for k in b.metadata["keys"]]
    assert c["skipped_samples"] == 1 and c["truncated_samples"] == 0
    assert len(keys) == len(set(keys)) == len(_docs(dataset.root)) - 1
