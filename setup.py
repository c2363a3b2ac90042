"""Packaging for megatron-navil.

Ranges here are what a cluster image (NGC container) must satisfy; the exact versions tested on
the development/CI machines are pinned in constraints.txt. DALI is published per CUDA major:
the default is the CUDA 13 build; set NAVIL_DALI_CUDA=120 at install time on CUDA 12 machines.
"""

import os

from setuptools import find_packages, setup

_DALI_CUDA = os.environ.get("NAVIL_DALI_CUDA", "130")
if _DALI_CUDA not in ("120", "130"):
    raise SystemExit(f"NAVIL_DALI_CUDA must be 120 or 130, got {_DALI_CUDA!r}")

setup(
    name="megatron-navil",
    version="0.1.0",
    description="Pretraining stack for NaViL-style native multimodal LLMs on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_navil*", "data_tools*", "checkpoint_tools*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.17",
        f"nvidia-dali-cuda{_DALI_CUDA}>=2.4,<3",
        "numpy",
        "sentencepiece",
        "safetensors",
        "pillow",
        "psutil",  # the torch_dist checkpoint writer of Megatron-Core needs it
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",  # navil-scaling fit's plots (Agg backend)
    ],
    extras_require={
        # Transformer Engine for the GPU backend (Megatron-Core 0.16.1 supports >=2.9,<2.12).
        # NOTE: NVIDIA apex is not on PyPI (the PyPI package named `apex` is unrelated): never add
        # it.
        "te": ["transformer-engine[pytorch]>=2.9,<2.12"],
        # transformers: tests load our HF tokenizer exports with AutoTokenizer (library code
        # never imports it). ruff: tests/test_lint.py (lint + format check, pyproject.toml).
        # webdataset, megatron-energon: tests/data_tools/test_interop.py (other readers of our
        # shards; `navil-preprocess --energon` needs megatron-energon too)
        "test": [
            "pytest",
            "scikit-image",
            "transformers",
            "ruff",
            "webdataset",
            "megatron-energon>=7,<8",
        ],
    },
    entry_points={
        "console_scripts": [
            "navil-demo=megatron_navil.cli.demo:main",
            "navil-pretrain=megatron_navil.cli.pretrain:main",
            "navil-caption=megatron_navil.cli.caption:main",
            "navil-scaling=megatron_navil.cli.scaling:main",
            "navil-make-captions=data_tools.synthetic_captions:main",
            "navil-preprocess=data_tools.preprocess:main",
            "navil-dedup=data_tools.dedup:main",
            "navil-tokenizer=data_tools.tokenizer_cli:main",
            "navil-inspect=data_tools.inspector:main",
            "navil-convert=checkpoint_tools.cli:main",
        ]
    },
)
