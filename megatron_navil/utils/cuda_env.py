"""CUDA_DEVICE_MAX_CONNECTIONS for tensor parallelism, decided at start-up.

With TP > 1 Megatron-Core issues TP communication kernels (all-gather / reduce-scatter under
sequence parallelism, the async all-reduce of the input gradient) that must be scheduled ahead of
the GEMMs they overlap with. With a single hardware work queue per device
(CUDA_DEVICE_MAX_CONNECTIONS=1) kernels start in issue order, so the communication kernel gets
the SMs first; with more queues a GEMM can grab them and the overlap is lost. Megatron-LM's
launch scripts export it; ours do too (examples/*.sh, *.sbatch, the scaling sweep's sbatch), and
navil-pretrain sets it itself when a launcher did not, before the first CUDA context is created
(the variable is read when the context is made). A different value set by the user is kept
(theirs to choose) but warned about once.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

VAR = "CUDA_DEVICE_MAX_CONNECTIONS"


def max_connections_decision(
    tensor_model_parallel_size: int, current: Optional[str], cuda: bool
) -> tuple[Optional[str], Optional[str]]:
    """(value to set or None, warning or None) for a run with this TP size on a machine with or
    without CUDA, given the variable's current value (None = unset)."""
    if not cuda or tensor_model_parallel_size <= 1:
        return None, None
    if current is None or current.strip() == "":
        return "1", None
    if current.strip() != "1":
        return None, (
            f"{VAR}={current} with tensor_model_parallel_size={tensor_model_parallel_size}: "
            "Megatron overlaps TP communication with compute only when it is 1 (one hardware "
            f"queue keeps kernels in issue order); export {VAR}=1 before launching"
        )
    return None, None


def ensure_max_connections(
    tensor_model_parallel_size: int,
    environ: Optional[MutableMapping[str, str]] = None,
    cuda: Optional[bool] = None,
) -> Optional[str]:
    """Apply `max_connections_decision` to `environ` (default os.environ); returns the warning
    (already logged, by rank 0 only: every rank decides the same) or None."""
    from megatron_navil.utils.logging import get_logger, global_rank

    log = get_logger(__name__)
    environ = os.environ if environ is None else environ
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()  # driver query only: creates no CUDA context
    value, warning = max_connections_decision(tensor_model_parallel_size, environ.get(VAR), cuda)
    if value is not None:
        environ[VAR] = value
        log.info("set %s=%s for tensor parallelism (the launcher did not)", VAR, value)
    if warning is not None and global_rank() == 0:
        log.warning(warning)
    return warning
