"""2D (vision) and 1D (LLM) rotary embeddings against explicit rotation matrices.

Proves the frequency layout: for head dim hd the vision encoder rotates the pairs (d, d + hd/2)
by angle row * theta^(-4d/hd) for d < hd/4 and by col * theta^(-4(d - hd/4)/hd) for
hd/4 <= d < hd/2 (Qwen2-VL / released NaViL), the LLM by pos * theta^(-2d/hd). Also the patch
(row, col) order (merge-block-major) and the relative-position property. The frequencies and
angles are float32 as in HF (both sides use the same float32 values), the rotation itself runs in
float64, so 1e-12 is plenty; a wrong pairing or frequency assignment is an O(1) error.
"""

import math

import torch

from megatron_navil.reference.rope import (
    apply_rotary,
    llm_rope_angles,
    vision_patch_positions,
    vision_rope_angles,
)


def _hf_inv_freq(dim: int, theta: float) -> list[float]:
    """The HF frequency formula, evaluated in float32 exactly as HF does (part of the spec)."""
    return (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))).tolist()


def _rotation(angles_per_pair: list[float]) -> torch.Tensor:
    """hd x hd matrix rotating pair (d, d + hd/2) by angles_per_pair[d] (rotate_half layout)."""
    half = len(angles_per_pair)
    r = torch.zeros(2 * half, 2 * half, dtype=torch.float64)
    for d, a in enumerate(angles_per_pair):
        c, s = math.cos(a), math.sin(a)
        r[d, d], r[d, d + half] = c, -s
        r[d + half, d], r[d + half, d + half] = s, c
    return r


def test_vision_rope_is_the_documented_rotation():
    hd, theta = 8, 10000.0
    positions = torch.tensor([[0, 0], [3, 1], [2, 5], [7, 7]])
    x = torch.randn(4, 2, hd, dtype=torch.float64)  # [N, heads, hd]
    got = apply_rotary(x, vision_rope_angles(positions, hd, theta))
    f = _hf_inv_freq(hd // 2, theta)  # hd/4 frequencies theta^(-4k/hd), shared by rows and cols
    for i, (r, c) in enumerate(positions.tolist()):
        # float32 angle table (as the release), then the rotation in float64
        angles = [float(torch.tensor(r * fk, dtype=torch.float32)) for fk in f]
        angles += [float(torch.tensor(c * fk, dtype=torch.float32)) for fk in f]
        want = x[i] @ _rotation(angles).T
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)


def test_vision_rope_depends_only_on_relative_offset():
    hd = 16
    q, k = torch.randn(hd, dtype=torch.float64), torch.randn(hd, dtype=torch.float64)

    def score(p, p2):
        a = vision_rope_angles(torch.tensor([p, p2]), hd, 10000.0)
        rq = apply_rotary(q.view(1, 1, hd).expand(2, 1, hd), a)[0, 0]
        rk = apply_rotary(k.view(1, 1, hd).expand(2, 1, hd), a)[1, 0]
        return float(rq @ rk)

    base = score((1, 2), (3, 5))
    assert abs(score((4, 4), (6, 7)) - base) < 1e-5  # same (dr, dc): float32 angles -> 1e-5
    assert abs(score((1, 2), (5, 3)) - base) > 1e-3  # rows/cols swapped offset: differs


def test_llm_rope_is_the_documented_rotation():
    hd, theta = 8, 1e6
    pos = torch.tensor([0, 1, 5, 123])
    x = torch.randn(4, 3, hd, dtype=torch.float64)
    got = apply_rotary(x, llm_rope_angles(pos, hd, theta))
    for i, p in enumerate(pos.tolist()):
        f = _hf_inv_freq(hd, theta)  # hd/2 frequencies theta^(-2d/hd)
        angles = [float(torch.tensor(p * fd, dtype=torch.float32)) for fd in f]
        torch.testing.assert_close(got[i], x[i] @ _rotation(angles).T, rtol=0, atol=1e-12)


def test_patch_positions_are_merge_block_major():
    pos = vision_patch_positions(torch.tensor([[1, 4, 6], [1, 2, 2]]), merge_size=2)
    want = []
    for br in range(2):
        for bc in range(3):
            want += [
                (2 * br, 2 * bc),
                (2 * br, 2 * bc + 1),
                (2 * br + 1, 2 * bc),
                (2 * br + 1, 2 * bc + 1),
            ]
    want += [(0, 0), (0, 1), (1, 0), (1, 1)]  # second image restarts at (0, 0)
    assert [tuple(p) for p in pos.tolist()] == want
