"""HostSyncCounter (megatron_navil/utils/host_syncs.py) counts exactly the calls that would block
the host on a GPU, so a zero from it means something (tests/data/test_pack_meta.py).

- Each device->host read it knows (`tolist`, `item`, `int`, `float`, `bool`, `nonzero`, boolean
  mask indexing and assignment, `repeat_interleave` without output_size, `cpu`) is one event,
  named with the caller's file and line.
- Tensors the code made on the host itself (a factory without `device=`, `.cpu()`, anything
  computed only from those) are host tensors: reading them is free, as on a GPU run.
- Pageable host->device copies (`torch.tensor(..., device=)`, `.to(device)` of a host tensor)
  are `h2d` events; a device-side factory (`torch.arange(n, device=)`) and ops on device
  tensors are not.
- Syncs the autograd engine runs itself in backward (a boolean-index gradient) are counted.
- The CPU generator's state (torch.get_rng_state, read by Megatron's RNG tracker) is a host
  tensor.
Where to look on failure: the rule tables at the top of host_syncs.py.
"""

import torch

from megatron_navil.utils.host_syncs import HostSyncCounter, is_host_tensor


def _device_tensor() -> torch.Tensor:
    # made before the counter starts: stands for a model input moved to the GPU
    return torch.arange(6.0)


def test_each_device_read_is_one_event_with_its_site():
    x = _device_tensor()
    with HostSyncCounter() as c:
        x.tolist()
        x[0].item()
        int(x[1])
        float(x[2])
        bool(x[3] > 0)
        (x > 2).nonzero()
        x[x > 2]
        x.clone()[x > 4] = 0.0
        x.long().repeat_interleave(x.long())
        x.cpu()
    ops = [e.op for e in c.syncs]
    assert ops == [
        "tolist",
        "item",
        "__int__",
        "__float__",
        "__bool__",
        "nonzero",
        "__getitem__[bool]",
        "__setitem__[bool]",
        "repeat_interleave",
        "cpu",
    ]
    assert all(e.site.startswith("tests/utils/test_host_syncs.py:") for e in c.syncs)
    assert c.h2d == []


def test_elementwise_and_index_ops_on_device_tensors_are_free():
    x = _device_tensor()
    with HostSyncCounter() as c:
        idx = torch.arange(3, device=x.device)  # made on the device: no copy
        y = (x * 2).index_select(0, idx).cumsum(0)
        y = torch.where(y > 1, y, 0.0)
        x.clone()[idx] = 1.0  # a long index: no nonzero
        x.long().repeat_interleave(x.long(), output_size=15)
        x.masked_fill(x > 3, 0.0)
    assert c.events == [], c.by_site()
    assert not is_host_tensor(y)


def test_host_made_tensors_are_free_to_read_and_cost_a_copy_to_move():
    x = _device_tensor()
    with HostSyncCounter() as c:
        sizes = torch.tensor([2, 4])  # host (no device=)
        assert is_host_tensor(sizes) and is_host_tensor(sizes * 2)
        sizes.tolist()  # a host read: free
        int(sizes.sum())
        moved = sizes.to(x.device)  # a pageable copy to the device
        torch.tensor([1, 2], device=x.device)  # the same, from Python data
        int(moved[0])  # moved: reading it back is a sync again
    assert [e.op for e in c.h2d] == ["to", "tensor(device=)"]
    assert [e.op for e in c.syncs] == ["__int__"]


def test_engine_run_backward_syncs_are_counted():
    w = torch.randn(5, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False])
    with HostSyncCounter() as c:
        w[mask].sum().backward()  # forward: a boolean index; backward: index_put with it
    assert [e.op for e in c.syncs] == ["__getitem__[bool]", "aten.index_put"]
    assert c.syncs[1].site == "autograd"


def test_cpu_rng_state_is_a_host_tensor():
    with HostSyncCounter() as c:
        state = torch.get_rng_state()
        assert bool((state == torch.get_rng_state()).all())
    assert c.events == [] and torch.get_rng_state is not None
    assert not is_host_tensor(torch.get_rng_state())  # the wrapper is gone after the counter
