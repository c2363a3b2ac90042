"""Inference helpers on the Megatron model (greedy decoding for smoke tests and the quickstart)."""
