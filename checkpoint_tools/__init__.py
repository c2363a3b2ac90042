"""navil-convert: HF <-> Megatron checkpoint conversion, LLM initialisation, verification."""
