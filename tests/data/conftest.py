"""Session fixtures for the loader tests: one tokenizer, one preprocessed dataset (a few
seconds with the real navil-preprocess), the matching debug model config and a loader factory."""

from __future__ import annotations

import logging

import pytest

from tests.data.corpus import make_dataset, model_config, train_tokenizer


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tok(tok_dir):
    from megatron_navil.data.tokenizer import NaViLTokenizer

    return NaViLTokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def cfg(tok):
    return model_config(tok)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, tok_dir):
    return make_dataset(str(tmp_path_factory.mktemp("ds")), tok_dir)


@pytest.fixture
def make_loader(tok, cfg):
    """build_train_loader with test defaults; closes every loader it made."""
    from megatron_navil.config.data import DataConfig
    from megatron_navil.data.loader import build_train_loader, build_valid_loader

    made = []

    def factory(
        paths, valid=False, dp_rank=0, dp_size=1, mbps=1, model_cfg=None, seq_length=256, **kw
    ):
        geometry = dict(seq_length=seq_length, seed=kw.pop("seed", 1234))  # the job's, not data's
        kw.setdefault("num_decode_threads", 2)
        kw.setdefault("plan_chunk_samples", 16)
        kw.setdefault("decode_device", "cpu")  # the GPU path is tested in test_gpu.py
        key = "valid_paths" if valid else "train_paths"
        dc = DataConfig(**{key: tuple(paths)}, **kw)
        mc = model_cfg or cfg
        loader = (
            build_valid_loader(dc, mc, tok, dp_rank, dp_size, **geometry)
            if valid
            else build_train_loader(dc, mc, tok, dp_rank, dp_size, mbps, **geometry)
        )
        made.append(loader)
        return loader

    yield factory
    for loader in made:
        loader.close()


@pytest.fixture
def navil_logs(caplog):
    """caplog that also sees the `navil` loggers (they do not propagate to the root)."""
    root = logging.getLogger("navil")
    root.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="navil")
    yield caplog
    root.removeHandler(caplog.handler)
