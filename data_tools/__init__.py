"""Offline data tools: raw corpora -> validated WebDataset shards + index, tokenizer, inspector.

Console scripts: `navil-preprocess` (data_tools.preprocess), `navil-tokenizer`
(data_tools.tokenizer_cli), `navil-inspect` (data_tools.inspector). The on-disk format they write
is specified in docs/data_format.md; the library (megatron_navil) reads it without importing
this package.
"""

FORMAT_VERSION = 1
"""Version of the on-disk shard/index format (docs/data_format.md); bumped on any change."""
