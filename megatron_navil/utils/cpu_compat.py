"""CPU compatibility layer: lets Megatron-Core's CUDA-only code paths run on CPU with gloo.

Megatron-Core 0.16.1 assumes CUDA in a handful of places that our CPU tests (and the CPU
quickstart) go through. `activate()` patches exactly those, and only when `needed()`: on a
machine with a GPU it returns without touching anything, so GPU behaviour never changes.

The condition: `needed()` is True iff torch sees no CUDA device. It is the ONE condition of
every CPU-only deviation of the project: this layer, CPU initialisation and unbatched p2p in
models/transformer_config.py, gloo instead of NCCL in utils/distributed.py. (The torch-Adam
workarounds of training/optimizer.py are keyed on Megatron having fallen back to torch's Adam,
which is always the case here but also on a GPU without TE or apex, where they are needed too.)

Lifetime (explicit; the layer is global process state):
- on: `activate()`, called first by the entry points (navil-pretrain, navil-caption,
  navil-demo), by navil-convert when it sets up its one-process Megatron world
  (conversion/layout.ensure_single_process_world), by the multi-process test workers, by
  tests/conftest.py (for the session and again before every test), and by
  `utils.distributed.initialize_model_parallel`, so any code path that builds Megatron's groups
  and then a model on CPU has it whoever called it;
- off: `deactivate()`, called by `utils.distributed.destroy()` (the end of every job).
`activate()` is idempotent; `deactivate()` restores every patched object (tested).

What it does, and why each piece is needed:

1. `torch.cuda.current_device()` returns the CPU device (the pipeline schedules, p2p
   communication, the MoE dispatchers and several layers allocate with
   `device=torch.cuda.current_device()`, also inside backward functions), and a
   `TorchFunctionMode` rewrites `device="cuda"`, `"cuda:N"`, `torch.device("cuda")` and integer
   device arguments of forward-time calls to CPU. `Tensor.cuda()` returns the tensor itself.
2. `torch.cuda.current_device/synchronize/Stream/Event/current_stream/stream/...` become CPU
   no-ops (the alltoall dispatcher creates a side stream; timers record events).
3. Megatron's RNG tracker (`tensor_parallel.random`) keeps "CUDA" RNG states for dropout; here
   they are states of the CPU generator. NOTE: dropout therefore draws from the same generator
   as CPU initialisation, so dropout RNG semantics differ from a GPU: parity tests run with
   dropout 0, and callers seed the CPU generator identically on all ranks before building a
   model (otherwise replicated TP parameters differ and dist_checkpointing saves one replica).
4. `te_general_gemm` is defined as None in `moe_utils` when Transformer Engine is absent
   (0.16.1 otherwise raises NameError in router gating; our modality router has no gate).
5. `torch.distributed.all_to_all_single` receives split sizes as numpy integers from the
   alltoall dispatcher, which torch 2.13 rejects: they are converted to Python ints.
6. gloo has no uneven `all_gather` / `reduce_scatter` (lists of differently sized tensors),
   which the MoE dispatchers use with TP x EP: on gloo groups these are emulated exactly
   (pad to the largest size and trim; all-reduce and keep this rank's slice).

7. `Tensor.type()` (no argument) reports CPU tensors as `torch.cuda.*Tensor`: Megatron's
   (distributed) optimizer and grad clipping accept parameters only after checking those
   strings.
NOTE: the function mode is pushed on torch's mode stack by `activate()`: call it outside any
other `TorchFunctionMode` (e.g. before, not inside, conversion/layout.py's meta-device mode).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)

_STATE: dict[str, Any] = {"active": False, "mode": None, "saved": []}


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d == "cuda" or d.startswith("cuda:")
    # An integer device index means a CUDA ordinal; on a CPU-only machine it can only be that.
    return isinstance(d, int) and not isinstance(d, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments of any torch function or Tensor method to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return (
                name.replace("torch.", "torch.cuda.", 1)
                if not name.startswith("torch.cuda.")
                else name
            )
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream on CPU: every operation is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = torch.device("cpu")

    def wait_stream(self, *a: Any, **k: Any) -> None: ...
    def wait_event(self, *a: Any, **k: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def record_event(self, event: Any = None) -> "_NullEvent":
        return event or _NullEvent()


class _NullEvent:
    """Stands in for torch.cuda.Event on CPU; elapsed_time uses wall-clock time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, *a: Any, **k: Any) -> None:
        import time

        self._t = time.perf_counter()

    def wait(self, *a: Any, **k: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_NullEvent") -> float:
        return (end._t - self._t) * 1000.0


def _patch(obj: Any, name: str, value: Any) -> None:
    _STATE["saved"].append((obj, name, getattr(obj, name, _MISSING)))
    setattr(obj, name, value)


_MISSING = object()


def needed() -> bool:
    """The one condition of every CPU-only deviation: no CUDA device (see the module docstring).
    Unaffected by the layer itself (it never patches `torch.cuda.is_available`)."""
    return not torch.cuda.is_available()


def is_active() -> bool:
    return bool(_STATE["active"])


def activate() -> bool:
    """Install the layer if `needed()`. Returns True when it is (now or already) active."""
    if not needed():
        return False
    if _STATE["active"]:
        return True

    cuda = torch.cuda
    # A CPU device object (not an index): `device=torch.cuda.current_device()` is Megatron's most
    # common allocation pattern and also runs inside autograd backward, where the function mode
    # below is not active (a mode is suspended while its handler runs torch.autograd.backward).
    _patch(cuda, "current_device", lambda: torch.device("cpu"))
    _patch(cuda, "synchronize", lambda *a, **k: None)
    _patch(cuda, "Stream", _NullStream)
    _patch(cuda, "Event", _NullEvent)
    _patch(cuda, "current_stream", lambda *a, **k: _NullStream())
    _patch(cuda, "default_stream", lambda *a, **k: _NullStream())
    _patch(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    _patch(cuda, "set_device", lambda *a, **k: None)
    _patch(cuda, "device_count", lambda: 0)
    _patch(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # torch.manual_seed itself calls cuda.manual_seed_all (a lazy no-op without CUDA): seed the
    # CPU generator directly to avoid recursing through it.
    _patch(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    for fn in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        _patch(cuda, fn, lambda *a, **k: 0)
    _patch(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    _patch(cuda, "empty_cache", lambda *a, **k: None)

    from megatron.core.tensor_parallel import random as mrandom

    _patch(mrandom, "_get_cuda_rng_state", lambda *a, clone=False, **k: torch.get_rng_state())
    _patch(mrandom, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        _patch(moe_utils, "te_general_gemm", None)

    original_a2a = torch.distributed.all_to_all_single

    @functools.wraps(original_a2a)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        to_list = lambda s: None if s is None else [int(x) for x in s]  # noqa: E731
        return original_a2a(
            output, input, to_list(output_split_sizes), to_list(input_split_sizes), **kw
        )

    _patch(torch.distributed, "all_to_all_single", all_to_all_single)

    original_all_gather = torch.distributed.all_gather
    original_reduce_scatter = torch.distributed.reduce_scatter

    @functools.wraps(original_all_gather)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        shapes = {tuple(t.shape) for t in tensor_list} | {tuple(tensor.shape)}
        if len(shapes) == 1 or async_op:
            return original_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows,) + tuple(tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original_all_gather(gathered, padded, group=group)
        for out, g in zip(tensor_list, gathered):
            out.copy_(g[: out.shape[0]])
        return None

    @functools.wraps(original_reduce_scatter)
    def reduce_scatter(
        output, input_list, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False
    ):
        if len({tuple(t.shape) for t in input_list}) == 1 or async_op:
            return original_reduce_scatter(
                output, input_list, op=op, group=group, async_op=async_op
            )
        full = torch.cat([t.flatten() for t in input_list])
        torch.distributed.all_reduce(full, op=op, group=group)
        rank = torch.distributed.get_rank(group)
        start = sum(t.numel() for t in input_list[:rank])
        output.copy_(full[start : start + output.numel()].view(output.shape))
        return None

    _patch(torch.distributed, "all_gather", all_gather)
    _patch(torch.distributed, "reduce_scatter", reduce_scatter)

    mode = _CudaToCpuMode()
    mode.__enter__()
    _STATE.update(active=True, mode=mode)
    log.debug("CPU compatibility layer active (no CUDA device)")
    return True


def deactivate() -> None:
    """Undo `activate()` (no-op when inactive)."""
    if not _STATE["active"]:
        return
    _STATE["mode"].__exit__(None, None, None)
    for obj, name, old in reversed(_STATE["saved"]):
        if old is _MISSING:
            delattr(obj, name)
        else:
            setattr(obj, name, old)
    _STATE.update(active=False, mode=None, saved=[])
