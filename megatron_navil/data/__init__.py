"""Data side of the library: image token layout, tokenizer, synthetic batches, the training loader.

Entry point of the loader: `megatron_navil.data.loader.build_train_loader` /
`build_valid_loader` with a `megatron_navil.config.data.DataConfig` (docs/data_loader.md).
Nothing is imported here, so `import megatron_navil.data.tokenizer` (data_tools does) stays light.
"""
