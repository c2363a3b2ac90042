"""Reading the shard index, and refusing or repairing what does not fit the loader.

Proves: an index counted with another tokenizer (manifest hash differs) or another chat
template is recounted from the samples' JSON (logged), after which every batch has exactly the
planned lengths (the builder checks each sample against the plan); with recount_tokens off such
a dataset is refused with a message naming why; an index whose token count lies is caught at
the sample with a message, not silently overflowing a pack; a directory without manifest.json
and a tokenizer whose special ids differ from the model's are refused with clear messages.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from megatron_navil.config.base import ConfigError
from megatron_navil.data.index import DataError
from tests.data.corpus import all_index_samples, epochs, model_config, reindex, sentence


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory):
    from megatron_navil.data.tokenizer import train_sentencepiece

    tok = train_sentencepiece(
        [sentence(k, 3 + k % 5) + " extra words here" for k in range(300)], vocab_size=480
    )
    return tok


def test_other_tokenizer_is_recounted(dataset, other_tok, navil_logs):
    cfg = model_config(other_tok)
    from megatron_navil.config.data import DataConfig
    from megatron_navil.data.loader import build_train_loader

    loader = build_train_loader(
        DataConfig(train_paths=(dataset.root,), num_decode_threads=2, decode_device="cpu"),
        cfg,
        other_tok,
        seq_length=256,
        seed=1234,
    )
    try:
        assert any("recounting" in r.getMessage() for r in navil_logs.records)
        batches, _ = epochs(loader, 1)
        for b in batches:
            b.validate(cfg)
        keys = {k for b in batches for k in b.metadata["keys"]}
        assert keys == {s["key"] for s in all_index_samples(dataset.root)}
    finally:
        loader.close()


def test_other_chat_style_is_recounted(dataset, make_loader, tok, cfg):
    loader = make_loader([dataset.root], chat_style="qwen3", add_bos=False)
    start = tok.special_token_id("<|im_start|>")
    batches, _ = epochs(loader, 1)
    convs = 0
    for b in batches:
        b.validate(cfg)
        for s in b.cu_seqlens.tolist()[: len(b.metadata["keys"])]:
            assert int(b.tokens[s]) != tok.bos_id  # neither qwen3 chats nor add_bos=False text
            convs += int(b.tokens[s]) == start
    assert convs == 3  # the three conversations, now in Qwen3 style


def test_recount_off_refuses(dataset, make_loader, other_tok):
    from megatron_navil.config.data import DataConfig
    from megatron_navil.data.loader import build_train_loader

    with pytest.raises(DataError, match="another tokenizer"):
        build_train_loader(
            DataConfig(train_paths=(dataset.root,), recount_tokens=False),
            model_config(other_tok),
            other_tok,
            seq_length=256,
            seed=1234,
        )


def test_lying_index_is_caught(dataset, make_loader, tmp_path):
    root = str(tmp_path / "lie")
    shutil.copytree(dataset.root, root)
    with open(os.path.join(root, "manifest.json")) as f:
        index_path = os.path.join(root, json.load(f)["shards"][0]["index"])
    with open(index_path) as f:
        index = json.load(f)
    index["samples"][0]["text_tokens"] += 3
    with open(index_path, "w") as f:
        json.dump(index, f)
    reindex(root)  # the loader reads the binary index made from the edited JSON
    loader = make_loader([root], prefetch_depth=0)
    with pytest.raises(RuntimeError, match="another tokenizer or template"):
        epochs(loader, 1)


def test_bad_paths_and_tokenizers_are_refused(tmp_path, make_loader, dataset, tok):
    with pytest.raises(DataError, match="no manifest.json"):
        make_loader([str(tmp_path)])
    bad = model_config(tok)
    bad = bad.replace(llm=bad.llm.replace(first_special_token_id=tok.first_special_token_id - 1))
    with pytest.raises(ConfigError, match="tokenizer gives"):
        make_loader([dataset.root], model_cfg=bad)


def test_old_chat_encoding_is_recounted(dataset, make_loader, tmp_path, navil_logs, tok):
    """An output counted under chat encoding 1 (header and content apart; manifests before the
    version was recorded) has its conversations recounted under the current whole-string
    encoding, so their lengths match what the builder makes; with recount off it is refused."""
    from megatron_navil.data.chat_template import CHAT_ENCODING_VERSION
    from megatron_navil.data.index import load_dataset

    root = str(tmp_path / "old")
    shutil.copytree(dataset.root, root)
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    assert manifest["settings"]["chat_encoding"] == CHAT_ENCODING_VERSION
    del manifest["settings"]["chat_encoding"]
    with open(path, "w") as f:
        json.dump(manifest, f)
    reindex(root)
    fresh = load_dataset(dataset.root, tok, "internlm2")
    navil_logs.clear()
    old = load_dataset(root, tok, "internlm2")
    assert any("chat encoding version 1" in r.getMessage() for r in navil_logs.records)
    assert old.recount_conversations and not old.recount_all
    assert not fresh.recount_conversations and not fresh.recount_all
    batches, _ = epochs(make_loader([root]), 1)
    assert batches
    with pytest.raises(DataError, match="chat encoding version 1"):
        load_dataset(root, tok, "internlm2", recount=False)
