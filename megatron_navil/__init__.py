"""megatron-navil: pretraining stack for NaViL-style native multimodal LLMs on Megatron-Core."""

import warnings as _warnings

__version__ = "0.1.0"

# Megatron-Core 0.16.1 warns at import and per layer about optional kernels (apex, TE) and
# deprecations that do not apply to how we call it; they would bury our own messages.
for _msg in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"MLP requires ffn_hidden_size",
    r"Warning: tp_group is None",
    # torch 2.13 deprecations hit inside Megatron's dist_checkpointing (not our calls).
    r"Please use DTensor instead",
    r".*torch.distributed.all_gather_into_tensor. is deprecated",
    r".*load_state_dict. is deprecated",
    r".*torch.jit.script_method. is deprecated",
):
    _warnings.filterwarnings("ignore", message=_msg)
