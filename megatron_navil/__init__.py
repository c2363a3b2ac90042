"""megatron-navil: pretraining stack for NaViL-style native multimodal LLMs on Megatron-Core."""

__version__ = "0.1.0"
