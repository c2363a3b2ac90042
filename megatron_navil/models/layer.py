"""Transformer layer and block that carry the modality routing and per-token RoPE explicitly.

The layer is pre-norm with optional LayerScale (the vision encoder's ls1/ls2):
    x = x + ls1 * attn(input_layernorm(x))
    x = x + ls2 * mlp(pre_mlp_layernorm(x))
`NaViLTransformerBlock` reuses Megatron's TransformerBlock for construction, pipeline layer
offsets, the final norm and sharded (dist_checkpointing) state dicts, and replaces only
`forward`: Megatron's block cannot pass extra per-call arguments to its layers. The routing is
captured per call (also inside activation-recompute closures), never stored on a module.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import Fp8Recipe
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    get_transformer_layer_offset,
)
from megatron.core.utils import get_pg_rank, make_viewless_tensor

from megatron_navil.models.modality import ModalityRouting
from megatron_navil.models.routed import build_routed


class LayerScale(torch.nn.Module):
    """Learned per-channel scale of a residual branch (CaiT / InternViT style)."""

    def __init__(self, config, hidden_size: int, init_value: float):
        super().__init__()
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.full((hidden_size,), init_value, dtype=config.params_dtype, device=device)
        )
        # Under sequence parallelism each TP rank scales only its chunk of the sequence, so the
        # gradient must be summed over TP (Megatron's finalize_model_grads keys on this flag).
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@dataclass
class NaViLLayerSubmodules:
    """Spec slots of NaViLTransformerLayer."""

    input_layernorm: Union[ModuleSpec, type]
    self_attention: Union[ModuleSpec, type]
    pre_mlp_layernorm: Union[ModuleSpec, type]
    mlp: Union[ModuleSpec, type]
    attn_layerscale: Union[ModuleSpec, type] = IdentityOp
    mlp_layerscale: Union[ModuleSpec, type] = IdentityOp


class NaViLTransformerLayer(MegatronModule, BaseTransformerLayer):
    """One pre-norm layer of the vision encoder or the LLM (formula in the module docstring).

    Built by Megatron's TransformerBlock from a spec (models/specs.py), with the model's
    ProcessGroupCollection (`pg_collection`, required: the layer's groups come from the model,
    never from parallel_state). `forward` passes the modality routing to the routed slots
    (attention's linears and q/k norms, the MLP: models/routed.py) and, in the vision encoder,
    swaps in the window segments on layers outside `full_attention_layers` (geometry/window.py).
    """

    def __init__(
        self,
        config,
        submodules: NaViLLayerSubmodules,
        layer_number: int = 1,
        pg_collection: Optional[ProcessGroupCollection] = None,
        vp_stage: Optional[int] = None,
        full_attention_layers: Optional[tuple[int, ...]] = None,
        **unused,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            raise ValueError("NaViLTransformerLayer needs the model's pg_collection")
        self.layer_number = layer_number + get_transformer_layer_offset(
            config, vp_stage, get_pg_rank(pg_collection.pp)
        )
        norm_kw = dict(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
        self.input_layernorm = build_module(submodules.input_layernorm, **norm_kw)
        self.self_attention = build_module(
            submodules.self_attention,
            config=config,
            layer_number=self.layer_number,
            pg_collection=pg_collection,
        )
        self.attn_layerscale = build_module(
            submodules.attn_layerscale, config=config, hidden_size=config.hidden_size
        )
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, **norm_kw)
        mlp_module = (
            submodules.mlp.module if isinstance(submodules.mlp, ModuleSpec) else submodules.mlp
        )
        # Megatron's MoE layers take the whole collection, its dense MLP only the TP group.
        if issubclass(mlp_module, MoELayer):
            self.mlp = build_routed(submodules.mlp, config=config, pg_collection=pg_collection)
            self.mlp.set_layer_number(self.layer_number)
        else:
            self.mlp = build_routed(submodules.mlp, config=config, tp_group=pg_collection.tp)
        self.mlp_layerscale = build_module(
            submodules.mlp_layerscale, config=config, hidden_size=config.hidden_size
        )
        self.bias_dropout_add = get_bias_dropout_add
        # Vision window attention: layers not listed attend within windows (see geometry/window.py).
        self.windowed = (
            full_attention_layers is not None and self.layer_number - 1 not in full_attention_layers
        )

    def _residual(self, out_with_bias, residual):
        # Megatron's bias-dropout-add; biases are already added inside the linears.
        return self.bias_dropout_add(self.training, self.config.bias_dropout_fusion)(
            out_with_bias, residual, self.config.hidden_dropout
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        rotary_freqs: torch.Tensor,
        packed_seq_params: PackedSeqParams,
        routing: Optional[ModalityRouting] = None,
        window_packed_seq_params: Optional[PackedSeqParams] = None,
    ):
        if self.windowed and window_packed_seq_params is not None:
            packed_seq_params = window_packed_seq_params
        attn_out, attn_bias = self.self_attention(
            self.input_layernorm(hidden_states),
            rotary_freqs=rotary_freqs,
            packed_seq_params=packed_seq_params,
            routing=routing,
        )
        assert attn_bias is None, "linears must add their own bias"
        hidden_states = self._residual((self.attn_layerscale(attn_out), None), hidden_states)

        mlp_out, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states), routing=routing)
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        hidden_states = self._residual((self.mlp_layerscale(mlp_out), None), hidden_states)
        return make_viewless_tensor(
            hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True
        )


class NaViLTransformerBlock(TransformerBlock):
    """Megatron's TransformerBlock with a forward that passes RoPE frequencies, packed-sequence
    params and the modality routing to every layer (with and without activation recompute).
    `pg_collection` is required (Megatron's block would read parallel_state without one)."""

    def __init__(self, config, spec, *, pg_collection: ProcessGroupCollection, **kwargs):
        if pg_collection is None:
            raise ValueError("NaViLTransformerBlock needs the model's pg_collection")
        super().__init__(config, spec, pg_collection=pg_collection, **kwargs)

    def forward(
        self,
        hidden_states: Optional[torch.Tensor],
        *,
        rotary_freqs: torch.Tensor,
        packed_seq_params: PackedSeqParams,
        routing: Optional[ModalityRouting] = None,
        window_packed_seq_params: Optional[PackedSeqParams] = None,
    ):
        if not self.pre_process:
            hidden_states = self.input_tensor  # set by the pipeline schedule
        hidden_states = make_viewless_tensor(hidden_states, requires_grad=True, keep_graph=True)
        cfg = self.config
        rng_context = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if cfg.sequence_parallel
            else nullcontext()
        )
        delayed_fp8 = bool(cfg.fp8) and cfg.fp8_recipe == Fp8Recipe.delayed
        outer = get_fp8_context(cfg) if delayed_fp8 else nullcontext()

        def layer_context(layer):
            if cfg.fp8 and not delayed_fp8:
                return get_fp8_context(cfg, layer.layer_number - 1)
            return nullcontext()

        def run(start: int, end: int):
            def run_layers(h, freqs):
                for layer in self.layers[start:end]:
                    with layer_context(layer):
                        h = layer(
                            h,
                            rotary_freqs=freqs,
                            packed_seq_params=packed_seq_params,
                            routing=routing,
                            window_packed_seq_params=window_packed_seq_params,
                        )
                return h

            return run_layers

        with rng_context, outer:
            if cfg.recompute_granularity == "full" and self.training:
                hidden_states = self._recompute(run, hidden_states, rotary_freqs)
            else:
                hidden_states = run(0, len(self.layers))(hidden_states, rotary_freqs)

        if self.final_layernorm is not None:
            hidden_states = make_viewless_tensor(
                self.final_layernorm(hidden_states), requires_grad=True, keep_graph=True
            )
        if not self.pre_process and len(self.layers) == 0 and self.final_layernorm is None:
            hidden_states = hidden_states.clone()  # an empty stage must not alias its input
        return hidden_states

    def _recompute(self, run, hidden_states, rotary_freqs):
        cfg = self.config
        if (
            torch.is_grad_enabled()
            and not hidden_states.requires_grad
            and any(p.requires_grad for p in self.parameters())
        ):
            # Megatron's and TE's checkpoints are reentrant autograd Functions: when no INPUT
            # requires grad their output does not either, and the layers' trainable weights get
            # no gradient (e.g. a stage training only the visual experts: the embeddings and
            # the vision encoder are frozen). A leaf that requires grad restores the graph.
            hidden_states = hidden_states.detach().requires_grad_(True)

        def checkpointed(fn, h):
            if cfg.fp8:
                from megatron.core.extensions.transformer_engine import te_checkpoint

                return te_checkpoint(
                    fn,
                    cfg.distribute_saved_activations,
                    tensor_parallel.random.get_cuda_rng_tracker,
                    self.tp_group,
                    h,
                    rotary_freqs,
                )
            return tensor_parallel.checkpoint(fn, cfg.distribute_saved_activations, h, rotary_freqs)

        n = len(self.layers)
        if cfg.recompute_method == "uniform":
            for start in range(0, n, cfg.recompute_num_layers):
                hidden_states = checkpointed(
                    run(start, min(n, start + cfg.recompute_num_layers)), hidden_states
                )
        elif cfg.recompute_method == "block":
            for i in range(n):
                if i < cfg.recompute_num_layers:
                    hidden_states = checkpointed(run(i, i + 1), hidden_states)
                else:
                    hidden_states = run(i, i + 1)(hidden_states, rotary_freqs)
        else:
            raise ValueError(f"unknown recompute_method {cfg.recompute_method!r}")
        return hidden_states
