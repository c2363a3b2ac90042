"""navil-convert: HF <-> Megatron checkpoint conversion, LLM initialisation, verification.

    navil-convert llm-to-navil --hf-llm DIR --flavor NAME --output CKPT [layout flags]
    navil-convert navil-to-hf  --load CKPT --output HF_DIR
    navil-convert hf-to-navil  --hf HF_DIR --output CKPT [layout flags]
    (HF weights are read from safetensors; `.bin` pickles only with --trust-pickle)
    navil-convert verify       --load CKPT --hf HF_DIR [--inputs FILE]

Layout flags use Megatron-LM's names (--tensor-model-parallel-size, ...). Errors a user can
cause print one line naming the file/key and what to do, exit status 2; `verify` exits 1 when
the logits differ beyond the tolerance. Outputs appear only when complete (temp dir + rename).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""--dtype choices: auto + megatron_navil.utils.dtypes.DTYPES (spelt out so that building the
parser does not import torch; tests/test_dtypes.py keeps the two equal)."""


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 5GB or 500MB")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    if m.group(3) and m.group(3).lower() == "ib":
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _layout_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "parallel layout the checkpoint is meant for (validated, recorded; "
        "the torch_dist files load at any layout)"
    )
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)


def _trust_pickle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read pytorch_model*.bin (pickle) weights when the directory has no safetensors, "
        "with torch.load(weights_only=True); without it they are refused (pickles can run code)",
    )


def _common(p: argparse.ArgumentParser, output: bool = True) -> None:
    if output:
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / log lines")


def build_parser() -> argparse.ArgumentParser:
    from megatron_navil.config.flavors import FLAVORS

    ap = argparse.ArgumentParser(prog="navil-convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("llm-to-navil", help="first NaViL checkpoint from an HF InternLM2/Qwen3 LLM")
    p.add_argument("--hf-llm", type=Path, required=True, help="HF LLM directory (safetensors)")
    p.add_argument(
        "--flavor",
        required=True,
        choices=sorted(FLAVORS),
        help="model flavor giving the vision encoder, connector and experts",
    )
    p.add_argument("--output", type=Path, required=True, help="Megatron checkpoint root to create")
    p.add_argument(
        "--first-special-token-id",
        type=int,
        default=None,
        help="id of </box> (default: end of the tokenizer vocabulary, else of the embedding)",
    )
    p.add_argument(
        "--visual-experts",
        choices=("copy", "random"),
        default=None,
        help="initialise visual experts as copies of the text weights (flavor default) or fresh",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh vision/connector weights")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="stored dtype (auto: the LLM's)")
    _trust_pickle(p)
    _layout_flags(p)
    _common(p)

    p = sub.add_parser(
        "navil-to-hf", help="Megatron checkpoint (any TP/PP/EP) -> HF NaViL directory"
    )
    p.add_argument("--load", type=Path, required=True, help="checkpoint root or iter_* directory")
    p.add_argument("--output", type=Path, required=True, help="HF directory to create")
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer files to include (default: the one the checkpoint carries)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="stored dtype (auto: as saved)")
    p.add_argument("--max-shard-size", type=_size, default="5GiB", help="per safetensors file")
    p.add_argument(
        "--modeling-code",
        type=Path,
        default=None,
        help="local copy of the released NaViL code to include (offline clusters); "
        "default: config.json points at the family's hub repository",
    )
    _common(p)

    p = sub.add_parser(
        "check-release", help="what the released NaViL code would reject in an HF directory"
    )
    p.add_argument("hf_dir", type=Path, help="HF NaViL directory (navil-to-hf output)")

    p = sub.add_parser("hf-to-navil", help="HF NaViL directory -> Megatron checkpoint")
    p.add_argument(
        "--hf", type=Path, required=True, help="HF NaViL directory (config.json + safetensors)"
    )
    p.add_argument("--output", type=Path, required=True, help="Megatron checkpoint root to create")
    p.add_argument(
        "--first-special-token-id",
        type=int,
        default=None,
        help="only for configs that do not record it and have no tokenizer files",
    )
    p.add_argument("--step", type=int, default=0, help="iteration number to write")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="stored dtype (auto: as in HF)")
    _trust_pickle(p)
    _layout_flags(p)
    _common(p)

    p = sub.add_parser("verify", help="compare logits of a Megatron checkpoint and an HF directory")
    p.add_argument("--load", type=Path, required=True, help="checkpoint root or iter_* directory")
    p.add_argument("--hf", type=Path, required=True, help="HF NaViL directory")
    p.add_argument(
        "--inputs",
        type=Path,
        default=None,
        help="torch file with a dict: tokens [T] (+ position_ids, cu_seqlens, "
        "pixel_values, grid_thw); default: generated samples with images",
    )
    p.add_argument("--seq-length", type=int, default=128, help="length of the generated pack")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.add_argument("--atol", type=float, default=1e-3, help="max allowed |logit difference|")
    p.add_argument(
        "--max-kl", type=float, default=1e-5, help="max allowed KL(HF || Megatron) per position"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of both models",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap


def _dtype(name: str):
    from megatron_navil.utils.dtypes import torch_dtype

    return None if name == "auto" else torch_dtype(name)


def _parallel(a):
    from megatron_navil.config.parallel import ParallelConfig

    tp, ep = a.tensor_model_parallel_size, a.expert_model_parallel_size
    # Sequence parallelism does not change a checkpoint; it is on where Megatron requires it.
    return ParallelConfig(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        pipeline_model_parallel_size=a.pipeline_model_parallel_size,
        sequence_parallel=tp > 1,
    )


def _summary(verb: str, report) -> str:
    return (
        f"{verb} {report.output}: {report.tensors} tensors, {report.bytes / 1e9:.2f} GB in "
        f"{report.seconds:.1f} s ({report.gb_per_s:.2f} GB/s)"
    )


def _print_release_check(hf_dir: Path, problems) -> int:
    """The release check's verdict on stdout: one line per problem; exit 1 if any."""
    if not problems:
        print(
            f"release check OK: {hf_dir} loads in the released NaViL code as far as config, "
            "tokenizer and weights can tell"
        )
        return 0
    print(f"release check: {len(problems)} problem(s) in {hf_dir} for the released NaViL code:")
    for line in problems:
        print(f"  {line}")
    print(f"fix them, then run: navil-convert check-release {hf_dir}")
    return 1


def run(a) -> int:
    progress = not getattr(a, "no_progress", False)
    if a.command == "llm-to-navil":
        from megatron_navil.config.flavors import get_flavor
        from megatron_navil.conversion.from_llm import llm_to_navil

        cfg, report = llm_to_navil(
            a.hf_llm,
            get_flavor(a.flavor),
            a.output,
            first_special_token_id=a.first_special_token_id,
            visual_experts=a.visual_experts,
            seed=a.seed,
            dtype=_dtype(a.dtype),
            parallel=_parallel(a),
            overwrite=a.overwrite,
            progress=progress,
            trust_pickle=a.trust_pickle,
        )
        print(_summary("wrote", report))
        print(
            f"special tokens from id {cfg.llm.first_special_token_id}; vocab {cfg.llm.vocab_size}; "
            f"visual experts: {cfg.experts.visual_init}; "
            f"resume with navil-pretrain --load {a.output}"
        )
    elif a.command == "hf-to-navil":
        from megatron_navil.conversion.to_megatron import import_hf

        _, report = import_hf(
            a.hf,
            a.output,
            step=a.step,
            dtype=_dtype(a.dtype),
            parallel=_parallel(a),
            first_special_token_id=a.first_special_token_id,
            overwrite=a.overwrite,
            progress=progress,
            trust_pickle=a.trust_pickle,
        )
        print(_summary("wrote", report))
    elif a.command == "navil-to-hf":
        from megatron_navil.conversion.to_hf import export_hf

        report = export_hf(
            a.load,
            a.output,
            tokenizer_dir=a.tokenizer,
            dtype=_dtype(a.dtype),
            max_shard_bytes=a.max_shard_size,
            overwrite=a.overwrite,
            progress=progress,
            modeling_code=a.modeling_code,
        )
        print(_summary("exported", report))
        _print_release_check(report.output, report.problems)  # the gate is check-release
    elif a.command == "check-release":
        from megatron_navil.conversion.release import check_release

        return _print_release_check(a.hf_dir, check_release(a.hf_dir))
    else:
        from megatron_navil.conversion.verify import verify
        from megatron_navil.utils.files import write_json_atomic

        r = verify(
            a.load,
            a.hf,
            a.inputs,
            seq_length=a.seq_length,
            seed=a.seed,
            atol=a.atol,
            max_kl=a.max_kl,
            dtype=_dtype(a.dtype),
        )
        if a.json:
            write_json_atomic(a.json, r.__dict__, indent=2)
        print(
            f"{'OK' if r.ok else 'MISMATCH'}: {r.positions} positions, max |logit diff| "
            f"{r.max_abs_diff:.3g} (atol {a.atol:g}), KL mean {r.mean_kl:.3g} max {r.max_kl:.3g} "
            f"(max allowed {a.max_kl:g}); tokenizer: {r.tokenizer}"
        )
        return 0 if r.ok else 1
    return 0


def _main(argv: Optional[Sequence[str]]) -> int:
    a = build_parser().parse_args(argv)
    # Megatron's loader goes through deprecated torch ShardedTensor APIs; not actionable here.
    warnings.filterwarnings(
        "ignore", message=".*(Please use DTensor|`load_state_dict` is deprecated).*"
    )
    return run(a)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_navil.conversion.layout import release_single_process_world
    from megatron_navil.utils.cli import run_cli

    return run_cli(
        _main,
        argv,
        cleanup=release_single_process_world,
        interrupted="interrupted; nothing was written (outputs appear only when complete)",
    )


if __name__ == "__main__":
    sys.exit(main())
