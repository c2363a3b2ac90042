"""Data side of the library: image token layout, synthetic batches, the training loader."""
