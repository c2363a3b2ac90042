"""navil-tokenizer: train a sentencepiece tokenizer with NaViL's special tokens, or wrap one.

    navil-tokenizer train --input 'corpus/*.jsonl' --vocab-size 32000 --output tok/
    navil-tokenizer wrap --model internlm2/tokenizer.model --output tok/
    navil-tokenizer info tok/ --encode "<img><IMG_CONTEXT></img> a cat"

Both write a directory (tokenizer.model + navil_tokenizer.json) that `--tokenizer` of
navil-preprocess and the training loader load with data_tools.tokenizer.NaViLTokenizer.load.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterator, Optional, Sequence

from data_tools.cli_common import UsageError, format_table, write_text
from data_tools.inputs import discover, iter_records
from data_tools.samples import IMAGE_PLACEHOLDER, Reject, parse_record
from megatron_navil.data.tokenizer import NaViLTokenizer, TokenizerError, train_sentencepiece
from megatron_navil.utils.cli import run_cli
from megatron_navil.utils.logging import get_logger
from megatron_navil.utils.progress import Progress

logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="navil-tokenizer",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train a fresh sentencepiece model on corpus text",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="corpus files, globs or folders (same formats as navil-preprocess)",
    )
    t.add_argument("--output", required=True, help="directory to write the tokenizer to")
    t.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="final vocabulary size including the 12 special tokens (they take the "
        "last 12 ids); smaller if the corpus cannot support it",
    )
    t.add_argument(
        "--model-type",
        default="bpe",
        choices=["bpe", "unigram"],
        help="sentencepiece algorithm (InternLM2 uses BPE)",
    )
    t.add_argument(
        "--max-texts",
        type=int,
        default=2_000_000,
        help="sample at most this many texts for training",
    )
    t.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="do not reserve the 256 byte pieces (unknown characters become <unk>)",
    )
    w = sub.add_parser(
        "wrap",
        help="wrap an existing sentencepiece model (e.g. InternLM2's)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    w.add_argument("--model", required=True, help="sentencepiece tokenizer.model to wrap")
    w.add_argument("--output", required=True, help="directory to write the tokenizer to")
    i = sub.add_parser(
        "info",
        help="show a tokenizer's ids and optionally encode text",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    i.add_argument("tokenizer", help="tokenizer directory or .model file")
    i.add_argument("--encode", default=None, help="text to encode and show")
    return p


def corpus_texts(inputs: Sequence[str], counter: Optional[dict] = None) -> Iterator[str]:
    """Every text of a corpus (captions, texts, conversation turns) with placeholders removed."""
    _, files = discover(inputs)
    total = sum(f.size for f in files)
    counter = counter if counter is not None else {}
    for rec in iter_records(files, 0, total, None):
        try:
            if rec.error:
                raise Reject(*rec.error)
            s = parse_record(rec.line, rec.obj, rec.base_dir, None)
        except Reject:
            counter["skipped"] = counter.get("skipped", 0) + 1
            continue
        texts = [t["content"] for t in s.conversations] if s.conversations else [s.text]
        for t in texts:
            t = t.replace(IMAGE_PLACEHOLDER, "").strip()
            if t:
                counter["texts"] = counter.get("texts", 0) + 1
                yield t


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "train":
            counts: dict = {}
            progress = Progress("texts")

            def texts():
                for t in corpus_texts(a.input, counts):
                    progress.update(1)
                    yield t

            tok = train_sentencepiece(
                texts(),
                a.vocab_size,
                a.model_type,
                a.max_texts,
                byte_fallback=not a.no_byte_fallback,
            )
            progress.close()
            tok.source = ",".join(a.input)
            if not counts.get("texts"):
                raise UsageError(f"--input {' '.join(a.input)} holds no text to train on")
            tok.save(a.output)
            logger.info(
                "trained on %d texts (%d records skipped)",
                counts.get("texts", 0),
                counts.get("skipped", 0),
            )
        elif a.cmd == "wrap":
            if not os.path.isfile(a.model):
                raise UsageError(
                    f"--model {a.model!r} is not a file; pass a sentencepiece tokenizer.model"
                )
            tok = NaViLTokenizer.load(a.model)
            tok.save(a.output)
        else:
            if not os.path.exists(a.tokenizer):
                raise UsageError(f"{a.tokenizer!r} does not exist")
            tok = NaViLTokenizer.load(a.tokenizer)
    except TokenizerError as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # sentencepiece trainer errors (e.g. vocab too large for corpus)
        raise UsageError(
            f"sentencepiece training failed: {e}; try a smaller --vocab-size"
        ) from None
    write_text(_summary(tok, getattr(a, "output", None), getattr(a, "encode", None)))
    return 0


def _summary(tok: NaViLTokenizer, out: Optional[str], text: Optional[str]) -> str:
    rows = [
        ["origin", tok.origin],
        ["vocab_size", tok.vocab_size],
        ["base (sentencepiece) pieces", tok.base_vocab_size],
        ["first_special_token_id", tok.first_special_token_id],
        ["bos / eos / pad / unk", f"{tok.bos_id} / {tok.eos_id} / {tok.pad_id} / {tok.unk_id}"],
        ["template tokens", json.dumps(tok.template_tokens)],
    ]
    rows += [[name, i] for name, i in tok.special_tokens.items()]
    s = format_table(rows, ["tokenizer", "value"])
    if text is not None:
        ids = tok.encode(text)
        s += f"\nencode({text!r}) = {ids}\npieces: {[tok.id_to_token(i) for i in ids]}"
    if out:
        s += f"\nwritten to {out}"
    return s


if __name__ == "__main__":
    raise SystemExit(main())
