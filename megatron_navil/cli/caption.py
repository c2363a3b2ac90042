"""navil-caption: greedy caption (or answer) for an image with a trained NaViL checkpoint.

Loads any checkpoint (layout-free) into a single process, builds the prompt as training did for
captions (`[BOS] <image tokens> [prompt text]`), and decodes greedily until EOS.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_navil.utils.logging import get_logger

log = get_logger(__name__)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="navil-caption", description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="checkpoint root or iter_* directory")
    p.add_argument("--tokenizer-model", required=True, help="NaViL tokenizer directory")
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("--prompt", default="", help="text after the image (default: none, captioning)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation budget")
    p.add_argument("--multiscale", action="store_true", help="feed the multi-scale pyramid")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompt with BOS")
    args = p.parse_args(argv)

    import torch

    from megatron_navil import checkpoint as ckpt
    from megatron_navil.config import ParallelConfig, PrecisionConfig
    from megatron_navil.config.model import NaViLModelConfig
    from megatron_navil.data.tokenizer import NaViLTokenizer
    from megatron_navil.errors import UserError
    from megatron_navil.inference.generate import greedy_generate
    from megatron_navil.inference.images import prepare_image
    from megatron_navil.models.navil import NaViLModel
    from megatron_navil.utils.distributed import initialize_model_parallel

    try:
        meta = ckpt.read_metadata(args.load)
    except OSError as e:
        raise ckpt.CheckpointError(f"cannot read the metadata of {args.load}: {e}") from None
    cfg = NaViLModelConfig.from_dict(meta["model"])
    tok = NaViLTokenizer.load(args.tokenizer_model)
    initialize_model_parallel(ParallelConfig(), seed=0)
    model = NaViLModel(cfg, ParallelConfig(), PrecisionConfig(backend="local"))
    ckpt.load_model(args.load, [model])  # cfg came from this checkpoint
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    for path in args.image:
        try:
            pixels, grid, image_ids = prepare_image(path, cfg, args.multiscale)
        except (OSError, ValueError) as e:  # unreadable, corrupt or too small an image
            raise UserError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        prompt = ([] if args.no_bos else [tok.bos_id]) + image_ids + tok.encode(args.prompt)
        out = greedy_generate(
            model,
            prompt,
            pixel_values=pixels.to(device),
            grid_thw=grid.to(device),
            max_new_tokens=args.max_new_tokens,
            stop_ids=[tok.eos_id],
        )
        text = tok.decode([i for i in out if i != tok.eos_id])
        # stdout carries only the results (JSON lines, for pipes); logs go to stderr.
        sys.stdout.write(json.dumps({"image": path, "step": meta["step"], "caption": text}) + "\n")
        sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    from megatron_navil.utils import cpu_compat
    from megatron_navil.utils.cli import run_cli
    from megatron_navil.utils.distributed import teardown_if_new

    cleanup = teardown_if_new()  # decided before this job creates anything
    cpu_compat.activate()  # on CPU, Megatron needs the layer; the teardown turns it off
    return run_cli(_main, argv, interrupted="interrupted", cleanup=cleanup)


if __name__ == "__main__":
    sys.exit(main())
