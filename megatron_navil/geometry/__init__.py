"""Token and patch geometry shared by the loader (host metadata, data/ and pack_meta.py) and the
model: rotary angles (rope.py) and the vision encoder's attention windows (window.py). Pure
functions of positions, grids and the model config, below both so neither imports the other."""
