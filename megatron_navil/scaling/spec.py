"""What a plan is for: the cluster and the workload (typed configs, a docstring per field).

The bandwidth and efficiency defaults are stated figures for an H100 SXM cluster with NVLink 4
inside a node and 400 Gb/s InfiniBand (one NIC per GPU) between nodes, as achieved bus
bandwidths of large collectives, not link peaks; set your own from nccl-tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_navil.config.base import ConfigBase, ConfigError
from megatron_navil.config.flags import flag

GIB = 2**30


@dataclass
class ClusterSpec(ConfigBase):
    """The machines a run is planned for."""

    num_gpus: int = flag(8, "--gpus")
    """GPUs of the whole job."""
    gpus_per_node: int = flag(8, "--gpus-per-node")
    """GPUs in one node (TP and EP groups should stay inside one)."""
    gpu_memory_gb: float = flag(80.0, "--gpu-memory-gb")
    """Memory of one GPU in GB (1e9 bytes, as vendors state it: H100 80, H200 141)."""
    reserved_gb: float = flag(6.0, "--reserved-gb")
    """Memory per GPU the plan keeps free for what the model does not count: the CUDA context
    and cuBLAS/NCCL workspaces (~1-2 GB), the caching allocator's fragmentation, temporary
    buffers of the optimizer step."""
    peak_tflops: float = flag(989.0, "--peak-tflops")
    """Dense bf16 peak per GPU (H100/H200 SXM: 989), the MFU denominator."""
    intra_node_gbps: float = flag(300.0, "--intra-node-gbps")
    """Achieved bus bandwidth of collectives inside a node, GB/s per GPU (NVLink 4: ~300-360
    of 450 per direction)."""
    inter_node_gbps: float = flag(40.0, "--inter-node-gbps")
    """Achieved bus bandwidth of collectives across nodes, GB/s per GPU (400 Gb/s IB: ~40-45)."""

    def validate(self) -> None:
        super().validate()
        for name in ("num_gpus", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cluster.{name} must be >= 1")
        if self.num_gpus > self.gpus_per_node and self.num_gpus % self.gpus_per_node:
            raise ConfigError(
                f"{self.num_gpus} GPUs are not whole nodes of {self.gpus_per_node}: plan for a "
                "multiple of --gpus-per-node"
            )
        for name in ("gpu_memory_gb", "peak_tflops", "intra_node_gbps", "inter_node_gbps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"cluster.{name} must be positive")
        if not 0 <= self.reserved_gb < self.gpu_memory_gb:
            raise ConfigError("cluster.reserved_gb must lie in [0, gpu_memory_gb)")

    @property
    def usable_bytes(self) -> float:
        return (self.gpu_memory_gb - self.reserved_gb) * 1e9


@dataclass
class WorkloadSpec(ConfigBase):
    """The run being planned: sequence, batch, what trains, the image mix, numerics."""

    seq_length: int = flag(8192, "--seq-length")
    """Tokens per packed sequence (navil-pretrain --seq-length)."""
    global_batch_size: int = flag(256, "--global-batch-size")
    """Packs per optimizer step (navil-pretrain --global-batch-size)."""
    stage: Literal["full", "stage1", "stage2"] = flag("full", "--stage")
    """Which parts train (navil-pretrain stage.preset): stage1 freezes the text LLM, whose
    weights then take no gradient or optimizer memory."""
    visual_fraction: float = flag(0.6, "--visual-fraction")
    """Fraction of the LLM tokens that are visual (<IMG_CONTEXT>, <img>) in the data mix."""
    patches_per_image: int = flag(2048, "--patches-per-image")
    """Typical image (or scale) size in 16 px patches: the vision encoder's attention cost and,
    without fused attention, its score memory grow with its square."""
    tokens_per_sample: int = flag(1024, "--tokens-per-sample")
    """Typical sample length in a pack: the LLM's causal attention cost grows with its square."""
    dtype: Literal["bfloat16", "float32"] = flag("bfloat16", "--dtype")
    """Parameter and activation dtype (bf16 on GPUs; fp32 is what CPU runs use)."""
    backend: Literal["transformer_engine", "local"] = flag("transformer_engine", "--backend")
    """`transformer_engine`: fused attention (no score matrices kept). `local`: the pure-torch
    path, which keeps every attention probability matrix (CPU, or a GPU without TE)."""
    use_distributed_optimizer: bool = flag(True, "--use-distributed-optimizer")
    """Shard the optimizer state over data-parallel ranks (navil-pretrain's default)."""
    overlap_grad_reduce: bool = flag(True, "--overlap-grad-reduce")
    """Overlap the data-parallel gradient reduction with backward (hides it when backward is
    longer)."""

    def validate(self) -> None:
        super().validate()
        for name in ("seq_length", "global_batch_size", "patches_per_image", "tokens_per_sample"):
            if getattr(self, name) < 1:
                raise ConfigError(f"workload.{name} must be >= 1")
        if not 0.0 <= self.visual_fraction < 1.0:
            raise ConfigError("workload.visual_fraction must lie in [0, 1)")

    @property
    def param_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4


@dataclass
class PlanSettings(ConfigBase):
    """Everything `navil-scaling plan` takes besides the model (its flags are these fields')."""

    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    """The machines."""
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    """The run."""
