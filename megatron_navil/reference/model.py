"""NaViLReference: the whole model in the HF checkpoint layout, plain PyTorch.

```
pixel_values [N, 3*P*P], grid_thw [S, 3]                input_ids [T], position_ids [T], cu_seqlens
        |                                                        |
  vision_model (ViT, 2D RoPE, per image/scale)       tok_embeddings / embed_tokens      [T, D]
        | [N, C]                                                 |
  pixel shuffle: 4 consecutive patches -> [N/4, 4C]   special-token rows replaced by
        |                                             special_token_embedding           [T, D]
  mlp1 = LayerNorm -> Linear -> GELU -> Linear  ---->  <IMG_CONTEXT> rows overwritten,
        [N/4, D]                                      in order, by the visual tokens     [T, D]
                                                                 |
                                  visual = (id == <IMG_CONTEXT>) | (id == <img>)
                                                                 |
                                  LLM with modality experts, causal within each sample
                                                                 |
                                                     final norm -> LM head -> logits [T, V]
```
Semantics follow the released NaViL inference code; see docs/model.md for the evidence and for
the choices made where the release is silent.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_navil.config.model import SPECIAL_TOKENS, NaViLModelConfig
from megatron_navil.reference.common import segment_ids
from megatron_navil.reference.llm import LanguageModel
from megatron_navil.reference.loss import next_token_loss
from megatron_navil.reference.vision import VisionModel


def pixel_shuffle(x: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[N, C] encoder output (merge-block-major) -> [N / m^2, m^2 * C].

    The m*m consecutive patches of a merge block are concatenated along channels in their
    order (row-major inside the block: (0,0), (0,1), (1,0), (1,1) for m = 2); this equals the
    released `pixel_shuffle_v2` on the [-1, 2, 2, C] view.
    """
    n, c = x.shape
    unit = merge_size * merge_size
    if n % unit:
        raise ValueError(f"{n} patches cannot be merged in blocks of {unit}")
    return x.reshape(n // unit, unit * c)


class NaViLReference(nn.Module):
    """The whole NaViL model in plain PyTorch with the release's parameter names: the test oracle
    of the Megatron model and of the conversion (no Megatron, no shared code with models/)."""

    def __init__(self, cfg: NaViLModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        m = cfg.connector.merge_size
        c4, d = cfg.vision.hidden_size * m * m, cfg.llm.hidden_size
        self.vision_model = VisionModel(cfg.vision, m)
        # Sequential indices 0..3 give the released keys mlp1.0 / mlp1.1 / mlp1.3 (2 = GELU).
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(c4, eps=cfg.connector.layernorm_eps),
            nn.Linear(c4, d),
            nn.GELU(),  # exact erf GELU (nn.GELU() default), as in the release
            nn.Linear(d, d),
        )
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKENS), d)
        self.language_model = LanguageModel(cfg.llm, cfg.experts)

    # ------------------------------------------------------------------ pieces
    def visual_tokens(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Connector outputs [N_patches / m^2, D], in the order they fill <IMG_CONTEXT> runs."""
        x = self.vision_model(pixel_values, grid_thw)  # [N, C]
        return self.mlp1(pixel_shuffle(x, self.cfg.connector.merge_size))

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Modality routing mask [T] bool: True for <IMG_CONTEXT> and <img>, False otherwise."""
        return (input_ids == self.cfg.img_context_id) | (input_ids == self.cfg.img_start_id)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        grid_thw: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Input embeddings [T, D]: token table, then special-token rows, then visual tokens."""
        first = self.cfg.llm.first_special_token_id
        x = self.language_model.embed(input_ids)  # [T, D]
        # 1) Every special-token id takes its row of special_token_embedding (replacement, so the
        #    token table rows of these ids get no gradient), <IMG_CONTEXT> included ...
        idx = input_ids - first
        special = (idx >= 0) & (idx < len(SPECIAL_TOKENS))
        rows = self.special_token_embedding.weight[idx.clamp(0, len(SPECIAL_TOKENS) - 1)]
        x = torch.where(special[:, None], rows.to(x.dtype), x)
        # 2) ... and then the <IMG_CONTEXT> rows are overwritten by the visual tokens, in order.
        ctx = input_ids == self.cfg.img_context_id
        n_ctx = int(ctx.sum())
        if (pixel_values is None) != (grid_thw is None):
            raise ValueError("pass pixel_values and grid_thw together (or neither, for text only)")
        if pixel_values is None:
            if n_ctx:
                raise ValueError(
                    f"input_ids hold {n_ctx} <IMG_CONTEXT> tokens but no images were given "
                    "(0 visual tokens)"
                )
            return x
        feats = self.visual_tokens(pixel_values, grid_thw)
        if feats.shape[0] != n_ctx:
            raise ValueError(
                f"input_ids hold {n_ctx} <IMG_CONTEXT> tokens but the images give "
                f"{feats.shape[0]} merged visual tokens"
            )
        x = x.clone()
        x[ctx] = feats.to(x.dtype)
        return x

    # ------------------------------------------------------------------ forward / loss
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        grid_thw: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """One packed sequence -> logits [T, vocab_size] (float32). See the package docstring."""
        if input_ids.ndim != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and position_ids must both be [T]; got {tuple(input_ids.shape)} and "
                f"{tuple(position_ids.shape)}"
            )
        segments = segment_ids(cu_seqlens, input_ids.shape[0])
        x = self.embed(input_ids, pixel_values, grid_thw)
        return self.language_model(x, self.visual_mask(input_ids), position_ids, segments)

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
        *,
        input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """sum(w * ce) / sum(w) over text positions; see megatron_navil.reference.loss."""
        return next_token_loss(
            logits, labels, input_ids, self.cfg.img_context_id, loss_mask, weights
        )

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights_(
        self,
        generator: Optional[torch.Generator] = None,
        std: Optional[float] = None,
        noise: float = 0.1,
    ) -> "NaViLReference":
        """Deterministic random init (for tests and parity runs, not for training recipes).

        Linear/conv/embedding weights ~ N(0, std) (std defaults to the config's init_method_std,
        vision and LLM separately); biases ~ N(0, std) when noise > 0 else 0; norm weights
        1 + noise * N(0, 1); LayerScale layerscale_init * (1 + noise * N(0, 1)). Non-trivial
        norms and biases make bugs in them visible; noise = 0 gives the plain init.
        """

        def randn(shape):
            return torch.randn(shape, generator=generator, dtype=torch.float32)

        groups = (
            (self.vision_model, self.cfg.vision.init_method_std),
            (self.mlp1, self.cfg.llm.init_method_std),
            (self.special_token_embedding, self.cfg.llm.init_method_std),
            (self.language_model, self.cfg.llm.init_method_std),
        )
        for module, default_std in groups:
            s = default_std if std is None else std
            for name, p in module.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in ("ls1", "ls2"):
                    p.copy_(self.cfg.vision.layerscale_init * (1 + noise * randn(p.shape)))
                elif leaf == "weight" and p.ndim == 1:  # RMSNorm / LayerNorm scales
                    p.copy_(1 + noise * randn(p.shape))
                elif leaf == "bias":
                    p.copy_(randn(p.shape) * (s if noise > 0 else 0.0))
                else:
                    p.copy_(randn(p.shape) * s)
        return self
