"""Count the calls that would stall the host on a GPU: device->host reads and pageable H2D copies.

On a GPU, reading a device tensor's values on the host (`.tolist()`, `.item()`, `int(t)`,
`bool(t)`, `nonzero`, boolean-mask indexing, `repeat_interleave` without `output_size`, ...)
blocks the Python thread until every queued kernel has run, so the CPU stops running ahead of
the GPU; `torch.tensor(python_list, device=cuda)` and `.to(cuda)` of a host tensor are copies
from pageable memory that the driver stages synchronously. On the CPU neither is visible, so
this module counts the calls that WOULD sync, on any device, for tests (tests/utils/
test_host_syncs.py, tests/data/test_pack_meta.py) and the GPU step benchmark's "host syncs per
micro-batch" column.

Which tensors would live on the GPU: every tensor is taken to be a device tensor except those
the code under test makes on the host itself: a factory call without `device=` (`torch.tensor`,
`torch.arange`, ...), `.cpu()`, and whatever is computed only from such tensors. Model inputs,
parameters and autograd's gradients are device tensors (a training step moves the batch to the
GPU first), so a test can run the real model on CPU tensors and get the GPU's count.

Two layers see the calls:
- a TorchFunctionMode sees every Python-level torch call (forward, and custom autograd
  Functions' backward code), with the host/device bookkeeping above;
- a TorchDispatchMode sees the aten ops the autograd engine runs itself in backward (outside any
  Python-level call), all on device tensors, and counts the syncing ones.

    with HostSyncCounter() as counter:
        loss = model(**batch.model_inputs()).sum()
        loss.backward()
    counter.syncs        # events of kind "sync"; counter.h2d: pageable host->device copies
    counter.by_site()    # {"megatron_navil/models/language.py:120 nonzero": 1, ...}
"""

from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_HOST_TAG = "_navil_host_tensor"
"""Attribute set on tensors the code under test made on the host (see the module docstring)."""

# Python-level calls that read a device tensor's values on the host.
_READ_METHODS = {
    "tolist",
    "item",
    "__int__",
    "__float__",
    "__bool__",
    "__index__",
    "__complex__",
    "numpy",
    "cpu",
    "__repr__",
    "__format__",
}
# Calls whose output size depends on the values: the host waits for them to learn it.
_DATA_DEPENDENT = {
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "bincount",
    "equal",
    "allclose",
}
_FACTORIES_FROM_DATA = {"tensor", "as_tensor", "from_numpy"}
# aten ops that sync when the autograd engine runs them itself (backward).
_ATEN_SYNCS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "is_nonzero",
    "equal",
    "bincount",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
}

_ENGINE_ENTRIES = {"backward", "grad", "_engine_run_backward"}
_ATEN_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


@dataclass(frozen=True)
class HostSyncEvent:
    """One call that would block the host on a GPU."""

    kind: str
    """`sync` (a device->host read) or `h2d` (a copy from pageable host memory to the device)."""
    op: str
    """The torch call: `tolist`, `nonzero`, `__getitem__[bool]`, `tensor(device=)`, ...; aten
    ops the autograd engine ran are `aten.<name>`."""
    site: str
    """Innermost caller outside torch, as `path:line` relative to its package root."""


def is_host_tensor(t: torch.Tensor) -> bool:
    """Made on the host by the code under test (never moved to the device)."""
    return bool(getattr(t, _HOST_TAG, False))


def _tag_host(out: Any) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            try:
                setattr(t, _HOST_TAG, True)
            except (AttributeError, RuntimeError):  # a tensor type without a __dict__
                pass


def _has_bool(indices) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(indices)[0]
    )


def _call_site() -> str:
    """path:line of the innermost frame outside torch and this module."""
    f = sys._getframe(2)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if path != _THIS_FILE and not path.startswith(_TORCH_DIR):
            parts = path.split(os.sep)
            for root in ("megatron_navil", "megatron", "tests", "benchmarks"):
                if root in parts:
                    path = "/".join(parts[len(parts) - parts[::-1].index(root) - 1 :])
                    break
            return f"{path}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


@dataclass
class _State:
    depth: int = 0
    """Python-level torch calls in progress (>0: aten ops belong to one, counted there)."""
    events: list[HostSyncEvent] = field(default_factory=list)


class _FunctionLayer(TorchFunctionMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if not is_host_tensor(t)]
        event = self._event(name, args, kwargs, tensors, on_device)
        if event is not None:
            self.state.events.append(HostSyncEvent(event[0], event[1], _call_site()))
        # backward() hands over to the autograd engine: the aten ops it runs are the engine's
        depth, self.state.depth = (
            self.state.depth,
            0 if name in _ENGINE_ENTRIES else self.state.depth + 1,
        )
        try:
            out = func(*args, **kwargs)
        finally:
            self.state.depth = depth
        if self._output_on_host(name, args, kwargs, tensors, on_device):
            _tag_host(out)
        elif event is not None and event[0] == "h2d" and out is args[0]:
            # on the CPU `.to(cpu)` returns the host tensor itself; on a GPU it is a new device
            # tensor: give the caller a distinct one, so the host tag stays with the original
            out = out.clone()
        return out

    @staticmethod
    def _explicit_device(name: str, args, kwargs) -> Optional[torch.device]:
        """The device a call moves to or creates on, when it names one."""
        if name == "cuda":
            return torch.device("cuda")
        if name == "to":
            try:
                device, _, _, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            except (TypeError, RuntimeError):  # a form _parse_to does not know: no move assumed
                return None
            return device
        dev = kwargs.get("device")
        return None if dev is None else torch.device(dev)

    def _event(self, name, args, kwargs, tensors, on_device) -> Optional[tuple[str, str]]:
        subject = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in _READ_METHODS and subject is not None and not is_host_tensor(subject):
            return "sync", name
        if name in _DATA_DEPENDENT and on_device:
            if name == "nonzero" or kwargs.get("as_tuple") is None:
                return "sync", name
        if name == "where" and len(args) == 1 and on_device:
            return "sync", "where(cond)"
        if name == "repeat_interleave" and on_device and kwargs.get("output_size") is None:
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
            if isinstance(repeats, torch.Tensor):
                return "sync", "repeat_interleave"
        if name in ("__getitem__", "__setitem__") and subject is not None and on_device:
            if len(args) > 1 and _has_bool(args[1]):
                return "sync", f"{name}[bool]"
        device = self._explicit_device(name, args, kwargs)
        if device is not None:
            if name in _FACTORIES_FROM_DATA:
                return "h2d", f"{name}(device=)"
            if name in ("to", "cuda") and subject is not None and is_host_tensor(subject):
                return "h2d", name
        if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
            if is_host_tensor(args[1]) and not is_host_tensor(args[0]):
                return "h2d", "copy_"
        return None

    def _output_on_host(self, name, args, kwargs, tensors, on_device) -> bool:
        if name == "cpu":
            return True
        if self._explicit_device(name, args, kwargs) is not None:
            return False
        return not on_device  # no device tensor went in (a pure factory included)


class _DispatchLayer(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.depth == 0:  # run by the autograd engine, not by a Python-level call
            base = func.overloadpacket.__name__
            syncs = (
                base in _ATEN_SYNCS
                or (
                    base == "repeat_interleave"
                    and func._overloadname.startswith("Tensor")
                    and kwargs.get("output_size") is None
                )
                # a boolean index is turned into positions by a nonzero inside the kernel
                or (base in _ATEN_INDEXING and len(args) > 1 and _has_bool(args[1]))
            )
            if syncs:
                self.state.events.append(HostSyncEvent("sync", f"aten.{base}", "autograd"))
        return func(*args, **kwargs)


class HostSyncCounter:
    """Context manager recording the calls that would block the host on a GPU (module doc)."""

    def __init__(self):
        self._state = _State()
        self._modes: list = []
        self._rng_state = torch.get_rng_state  # restored on exit (see __enter__)

    def __enter__(self) -> "HostSyncCounter":
        # dispatch first: the function layer's calls reach aten through it
        self._modes = [_DispatchLayer(self._state), _FunctionLayer(self._state)]
        for m in self._modes:
            m.__enter__()
        # torch.get_rng_state() returns the CPU generator's state, a host tensor on any machine,
        # without passing through a torch function: tag it (Megatron's RNG tracker compares it)
        self._rng_state = torch.get_rng_state

        def get_rng_state(*args, **kwargs):
            state = self._rng_state(*args, **kwargs)
            _tag_host(state)
            return state

        torch.get_rng_state = get_rng_state
        return self

    def __exit__(self, *exc) -> None:
        torch.get_rng_state = self._rng_state
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []

    @property
    def events(self) -> list[HostSyncEvent]:
        return list(self._state.events)

    @property
    def syncs(self) -> list[HostSyncEvent]:
        """Device->host reads."""
        return [e for e in self._state.events if e.kind == "sync"]

    @property
    def h2d(self) -> list[HostSyncEvent]:
        """Copies from pageable host memory to the device."""
        return [e for e in self._state.events if e.kind == "h2d"]

    def by_site(self, kind: Optional[str] = None) -> dict[str, int]:
        """{"site op": count}, most frequent first; `kind` filters (sync / h2d)."""
        c = collections.Counter(
            f"{e.site} {e.op}" for e in self._state.events if kind is None or e.kind == kind
        )
        return dict(c.most_common())


__all__ = ["HostSyncCounter", "HostSyncEvent", "is_host_tensor"]
