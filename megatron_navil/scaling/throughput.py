"""Step time of a layout: compute from a per-layer throughput table, communication from stated
bandwidths.

Compute: the trainer's own FLOP count (training/flops.py) per component of one micro-batch,
divided by that component's model TFLOP/s per GPU (`ThroughputTable`) and by TP, times a TP
efficiency (smaller GEMMs per GPU). The default table is the H100 measurements of
shared/design.md (dense Megatron-Core blocks, bf16, packed THD):
  LLM block  h2048: 491 TFLOP/s, h4096: 565 (x 0.94: the modality-split FFN reached 93-94%)
  ViT block  width 1024: 170, width 1536: 369 (bidirectional, images of 768-4096 patches)
  LM head / connector: 600 (assumed: plain GEMMs at ~75% of the 781 matmul peak)
between two widths the table interpolates in log(width); outside, it takes the nearest. A
measured file (`benchmarks/layer_throughput.json`, written by benchmarks/scaling_gpu_memory.py
on the GPU machine) replaces any of these rows.
Communication (not overlapped with compute unless stated): TP all-gathers/reduce-scatters of
the sequence per layer (4 forward + 4 backward, each moving (t-1)/t of T x h), the EP=2
all-to-all of the expert tokens (dispatch + combine, forward and backward), pipeline p2p of
T x h per stage boundary, and the DP gradient reduce-scatter + parameter all-gather (distributed
optimizer), hidden behind backward when `overlap_grad_reduce`. A group inside one node uses
`intra_node_gbps`, one that spans nodes `inter_node_gbps`.
Step = (micro-batches + PP - 1) x the slowest stage's micro-batch time (1F1B) + exposed DP time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_navil.errors import UserError

# (width, TFLOP/s) rows per component; bf16 on H100, see the module docstring.
DEFAULT_ROWS = {
    "llm": [(2048, 491.0 * 0.94), (4096, 565.0 * 0.94)],
    "vision": [(1024, 170.0), (1536, 369.0)],
    "lm_head": [(0, 600.0)],
    "connector": [(0, 600.0)],
}
TP_EFFICIENCY = {1: 1.0, 2: 0.95, 4: 0.9, 8: 0.85}
"""Fraction of the TP=1 throughput a GPU keeps at TP=t (narrower GEMMs); assumed, not measured:
a measured table can carry per-TP rows instead (`tp` field)."""


class ThroughputError(UserError):
    """A throughput file that cannot be used; the message names the file and the problem."""


@dataclass
class ThroughputTable:
    """Model TFLOP/s per GPU of each component, by width (and optionally TP)."""

    rows: dict = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ROWS.items()})
    """component -> [(width, tflops)] (TP = 1)."""
    source: str = "documented defaults (H100 bf16, shared/design.md)"
    """Where the numbers come from (shown in the plan)."""

    @classmethod
    def load(cls, path: Optional[str]) -> "ThroughputTable":
        """The defaults with the rows of a measured JSON file on top:
        {"device": ..., "rows": [{"component": "llm", "width": 2048, "tflops": 480.0}, ...]}."""
        table = cls()
        if path is None:
            return table
        try:
            data = json.loads(Path(path).read_text())
            rows = data["rows"]
            measured: dict = {}
            for r in rows:
                comp = r["component"]
                if comp not in DEFAULT_ROWS:
                    raise ThroughputError(
                        f"{path}: unknown component {comp!r} (known: {', '.join(DEFAULT_ROWS)})"
                    )
                if not float(r["tflops"]) > 0:
                    raise ThroughputError(f"{path}: tflops of {comp} must be positive")
                measured.setdefault(comp, []).append((int(r["width"]), float(r["tflops"])))
        except OSError as e:
            raise ThroughputError(f"cannot read throughput file {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ThroughputError(
                f"{path} is not a throughput table ({type(e).__name__}: {e}); expected "
                '{"rows": [{"component": "llm", "width": 2048, "tflops": 480.0}, ...]}'
            ) from None
        for comp, pts in measured.items():
            table.rows[comp] = sorted(pts)
        table.source = f"{path} ({data.get('device', 'device not stated')}) over the defaults"
        return table

    def tflops(self, component: str, width: int, tp: int = 1) -> float:
        pts = sorted(self.rows[component])
        if len(pts) == 1 or width <= pts[0][0]:
            value = pts[0][1]
        elif width >= pts[-1][0]:
            value = pts[-1][1]
        else:
            for (w0, t0), (w1, t1) in zip(pts, pts[1:]):
                if w0 <= width <= w1:
                    x = (math.log(width) - math.log(w0)) / (math.log(w1) - math.log(w0))
                    value = t0 + x * (t1 - t0)
                    break
        eff = TP_EFFICIENCY.get(tp, 0.85 * (8 / tp) ** 0.1)
        return value * eff


def collective_s(bytes_per_gpu: float, group: int, gbps: float) -> float:
    """Seconds of one ring all-gather / reduce-scatter: (n-1)/n of the data over the bus."""
    if group <= 1:
        return 0.0
    return (group - 1) / group * bytes_per_gpu / (gbps * 1e9)
