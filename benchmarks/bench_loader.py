"""Benchmark: the loader's decode + resize + patchify vs plain PIL + torch DataLoader, side by side.

    PYTHONPATH=. python benchmarks/bench_loader.py                     # CPU (this machine)
    PYTHONPATH=. python benchmarks/bench_loader.py --device gpu --dali-threads 8 \
        --pil-workers 16 --num-images 2048 --batch 64                  # GPU test machine

Images: real 1-2 MP JPEGs (quality 90): mosaics of scikit-image's bundled photos at their native
resolution (no upscaling, so the entropy the decoder meets is a photo's) with light sensor-like
grain. Both sides do the same work per image, from the file bytes to what the model consumes:
decode (EXIF applied) -> RGB -> NaViL resize (bicubic) of every scale -> [-1, 1] -> zero-pad to
32 px (-1) -> patches [gh*gw, 768] in merge-block order; scales from `layout` with the NaViL-2B
sizes (min 256 / max 24576 patches); single-scale (1-2 MP images fit under max_pixels, so only
padding) and multi-scale (the pyramid: 4-6 resizes per image).
- ours: `DaliImageDecoder` (the loader's decode stage), batches of --batch images, file bytes
  read in the timed loop; CPU operators (--device cpu) or `mixed` + GPU (--device gpu).
- PIL: `torch.utils.data.DataLoader(num_workers=--pil-workers, batch_size=--batch)` over a
  Dataset doing the same steps with PIL/numpy/torch.
- `--end-to-end` adds the whole loader (shards written by navil-preprocess, planning, tokens,
  decode, collation) in images/s, built synchronously (prefetch_depth 0): its throughput, not
  its overlap with a training step, and no background thread competing with the other sides.
Each measurement is steady state: one warm-up pass (workers/pipelines started), then the best
of --repeats timed passes, the sides alternating (on a shared machine, load changes then hit
all sides alike). Results go to --results (JSON, one entry per device) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageOps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_navil.config import get_flavor  # noqa: E402
from megatron_navil.data.decode import (  # noqa: E402
    DaliImageDecoder,
    ImageJob,
    normalize_pixels,
    patchify,
)
from megatron_navil.data.sizing import ImageSizer  # noqa: E402

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
)
SIZES = ((1400, 1000), (1600, 1067), (1280, 1280), (1500, 1200), (1200, 900), (1000, 1300))


def make_images(d: str, n: int, seed: int = 0) -> list[str]:
    import skimage.data as sd

    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(getattr(sd, p)()).convert("RGB")) for p in PHOTOS]
    os.makedirs(d, exist_ok=True)
    names = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        canvas = np.zeros((h, w, 3), dtype=np.int16)
        y = 0
        while y < h:  # rows of native-resolution crops of different photos
            x, row_h = 0, int(rng.integers(250, 500))
            while x < w:
                src = photos[int(rng.integers(len(photos)))]
                ch, cw = (
                    min(row_h, src.shape[0], h - y),
                    min(int(rng.integers(250, 600)), src.shape[1], w - x),
                )
                oy = int(rng.integers(0, src.shape[0] - ch + 1))
                ox = int(rng.integers(0, src.shape[1] - cw + 1))
                canvas[y : y + ch, x : x + cw] = src[oy : oy + ch, ox : ox + cw]
                x += cw
            y += row_h
        canvas += rng.normal(0, 3, canvas.shape).astype(np.int16)
        name = f"img{i:05d}.jpg"
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(
            os.path.join(d, name), quality=90
        )
        names.append(name)
    return names


class PilDataset(torch.utils.data.Dataset):
    """The baseline: the same per-image work with PIL + numpy + torch."""

    def __init__(self, paths: list[str], sizer: ImageSizer):
        self.paths, self.sizer = paths, sizer

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        im = ImageOps.exif_transpose(Image.open(self.paths[i])).convert("RGB")
        out = []
        for s in self.sizer.scales(im.height, im.width):
            h, w = s.resized
            r = (
                im
                if (h, w) == (im.height, im.width)
                else im.resize((w, h), Image.Resampling.BICUBIC)
            )
            out.append(normalize_pixels(patchify(torch.from_numpy(np.array(r)), s.padded, 16, 2)))
        return out


def interleaved_rates(runs: dict, repeats: int) -> dict:
    """Best images/s of each run (a callable returning the images it processed), alternating
    the runs so that load changes on a shared machine hit all of them alike."""
    for fn in runs.values():
        fn()  # warm-up: workers / pipelines / prefetch thread started, caches hot
    best = {k: 0.0 for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            n = fn()
            best[k] = max(best[k], n / (time.perf_counter() - t))
    return best


def pil_pass(paths, sizer, workers: int, batch: int):
    loader = torch.utils.data.DataLoader(
        PilDataset(paths, sizer),
        batch_size=batch,
        num_workers=workers,
        collate_fn=list,
        persistent_workers=workers > 0,
    )
    return lambda: sum(len(b) for b in loader)


def dali_pass(paths, sizer, device: str, threads: int, batch: int):
    sizes = [ImageOps.exif_transpose(Image.open(p)).size for p in paths]
    dec = DaliImageDecoder(batch, max(len(sizer.scales(h, w)) for w, h in sizes), threads, device)

    def run() -> int:
        for i in range(0, len(paths), batch):
            jobs = []
            for p, (w, h) in zip(paths[i : i + batch], sizes[i : i + batch]):
                with open(p, "rb") as f:
                    jobs.append(ImageJob(f.read(), h, w, sizer.scales(h, w)))
            out = dec.decode(jobs)
            assert all(isinstance(o, list) for o in out)
            normalize_pixels(torch.cat([p for o in out for p in o]))  # as the pack builder does
            if device == "gpu":
                torch.cuda.synchronize()
        return len(paths)

    return run


def loader_pass(img_dir, names, tmp, multiscale, device, threads, batch):
    """The whole loader over navil-preprocess shards: one call = about one epoch of images."""
    from data_tools.preprocess import main as preprocess
    from megatron_navil.config.data import DataConfig
    from megatron_navil.data.loader import build_train_loader
    from megatron_navil.data.tokenizer import train_sentencepiece

    tok_dir, out = os.path.join(tmp, "tok"), os.path.join(tmp, "shards")
    if not os.path.exists(out):
        tok = train_sentencepiece([f"a photo named {n} of things" for n in names * 4], 400)
        tok.save(tok_dir)
        with open(os.path.join(tmp, "caps.jsonl"), "w") as f:
            for n in names:
                f.write(json.dumps({"image": n, "text": f"a photo named {n}"}) + "\n")
        assert (
            preprocess(
                [
                    "--input",
                    os.path.join(tmp, "caps.jsonl"),
                    "--image-root",
                    img_dir,
                    "--output",
                    out,
                    "--tokenizer",
                    tok_dir,
                    "--log-every",
                    "1000",
                ]
            )
            == 0
        )
    from megatron_navil.data.tokenizer import NaViLTokenizer

    tok = NaViLTokenizer.load(tok_dir)
    cfg = get_flavor("navil-2b")
    cfg = cfg.replace(
        llm=cfg.llm.replace(
            vocab_size=tok.vocab_size,
            max_sequence_length=65536,
            first_special_token_id=tok.first_special_token_id,
        )
    )
    dc = DataConfig(
        train_paths=(out,),
        multiscale=multiscale,
        max_images_per_pack=batch,
        num_decode_threads=threads,
        decode_device=device,
        prefetch_depth=0,
    )  # synchronous: no background work while others are timed
    loader = build_train_loader(dc, cfg, tok, seq_length=32768, seed=1234)

    def run() -> int:
        start = loader.counters["images"]
        while loader.counters["images"] - start < len(names) * 0.9:
            next(loader)
        return loader.counters["images"] - start

    return run, loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=96)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dali-threads", type=int, default=os.cpu_count())
    p.add_argument("--pil-workers", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=16, help="images per decode batch")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per side (best kept)")
    p.add_argument("--end-to-end", action="store_true", help="also time the whole loader")
    p.add_argument(
        "--results", default=os.path.join(REPO, "benchmarks", "bench_loader_results.json")
    )
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_loader_")
    try:
        img_dir = os.path.join(tmp, "img")
        names = make_images(img_dir, a.num_images)
        paths = [os.path.join(img_dir, n) for n in names]
        mp = float(np.mean([np.prod(Image.open(q).size) for q in paths]) / 1e6)
        mb = float(np.mean([os.path.getsize(q) for q in paths]) / 1e6)
        rows = []
        for multiscale in (False, True):
            sizer = ImageSizer(get_flavor("navil-2b"), multiscale)
            mode = "multi-scale" if multiscale else "single-scale"
            runs = {
                "pil": pil_pass(paths, sizer, a.pil_workers, a.batch),
                "ours": dali_pass(paths, sizer, a.device, a.dali_threads, a.batch),
            }
            loader = None
            if a.end_to_end:
                runs["loader"], loader = loader_pass(
                    img_dir, names, tmp, multiscale, a.device, a.dali_threads, a.batch
                )
            rate = interleaved_rates(runs, a.repeats)
            row = {
                "mode": mode,
                "pil_img_s": rate["pil"],
                "dali_img_s": rate["ours"],
                "ratio": rate["ours"] / rate["pil"],
            }
            if loader is not None:
                row.update(loader_img_s=rate["loader"], loader_ratio=rate["loader"] / rate["pil"])
                loader.close()
            del runs  # stops the PIL workers before the next mode
            rows.append(row)
        device = (
            torch.cuda.get_device_name()
            if a.device == "gpu"
            else (platform.processor() or platform.machine())
        )
        entry = {
            "load_average_at_end": os.getloadavg(),
            "device": a.device,
            "hardware": device,
            "cpus": os.cpu_count(),
            "images": a.num_images,
            "mean_megapixels": mp,
            "mean_mb": mb,
            "dali_threads": a.dali_threads,
            "pil_workers": a.pil_workers,
            "batch": a.batch,
            "rows": rows,
            "command": "PYTHONPATH=. python benchmarks/bench_loader.py " + " ".join(sys.argv[1:]),
        }
        results = {}
        if os.path.exists(a.results):
            with open(a.results) as f:
                results = json.load(f)
        results[a.device] = entry
        with open(a.results, "w") as f:
            json.dump(results, f, indent=1)
        lines = [
            f"{a.num_images} JPEGs, mean {mp:.2f} MP / {mb:.2f} MB; {device}, "
            f"{os.cpu_count()} CPUs; DALI {a.device} {a.dali_threads} threads vs PIL "
            f"DataLoader {a.pil_workers} workers; batch {a.batch}",
            "| mode | PIL img/s | ours (decode stage) img/s | ratio |"
            + (" ours (whole loader) img/s | ratio |" if a.end_to_end else ""),
            "|---|---|---|---|" + ("---|---|" if a.end_to_end else ""),
        ]
        for r in rows:
            line = (
                f"| {r['mode']} | {r['pil_img_s']:.1f} | {r['dali_img_s']:.1f} | {r['ratio']:.2f} |"
            )
            if a.end_to_end:
                line += f" {r['loader_img_s']:.1f} | {r['loader_ratio']:.2f} |"
            lines.append(line)
        sys.stdout.write("\n".join(lines) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
