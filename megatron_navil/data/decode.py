"""Image decoding with NVIDIA DALI: bytes -> per-scale uint8 patches [gh*gw, 3*P*P].

One DALI pipeline per loader, fed by `fn.external_source` with the encoded bytes the loader
read by index offset (multi-image samples are not matched by DALI's webdataset reader):

    bytes -> decoders.image (device "cpu", or "mixed" = nvJPEG/HW decoder on the GPU), RGB
             uint8 HWC, EXIF orientation applied (DALI default; the index records post-rotation
             sizes)
          -> per scale slot s:
             resize to the NaViL size (bicubic, antialiased, uint8 out, like the release's PIL
               BICUBIC resize of the uint8 image), skipped per sample (DALI conditional) when
               the size is unchanged: most single-scale 1-2 MP photos with the released limits,
               where PIL's resize returns a copy and resampling would cost more than decoding
          -> pad bottom/right with 0 to the 32 px grid -> reshape [gh/2, 2, P, gw/2, 2, P, 3]
             -> transpose [gh/2, gw/2, 2, 2, 3, P, P] -> [gh*gw, 3*P*P] (merge-block order,
             each patch flattened (c, ph, pw))
    torch: `normalize_pixels` maps a whole pack to x/127.5 - 1 = (x/255 - 0.5)/0.5 in one pass
           (zero padding -> -1, as the release pads before normalising).
All per-image work runs in DALI's worker threads (or on the GPU); Python only copies results
out. The pipeline has a fixed number S of scale slots (the most scales any image of the data
has); unused slots process a 2x2 corner of the image (negligible work). `patchify` is the same
reordering in torch (used by the benchmark's PIL baseline).

GPU results are torch tensors made on the caller's current CUDA stream, complete when `decode`
returns (the loader runs it on a private stream and hands batches over with an event:
megatron_navil/data/cuda_handoff.py).

Failures: DALI invalidates a pipeline after any operator error, so on an error the pipeline is
rebuilt and the batch decoded image by image to find the culprits; an image whose decoded size
differs from the index is a failure too (the token layout was planned from the index sizes).
With `max_pixels` (the loader always sets it) an image is first checked from its header
(image_header.py): not JPEG/PNG/WebP, or more pixels than the limit, and it is a failure
(`refused`) without reaching DALI: the decompression-bomb guard.
"""

from __future__ import annotations

import ctypes
import functools
import io
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megatron_navil.data.image_header import check_image_bytes
from megatron_navil.data.layout import ImageScale

_SPARE_SCALE = ImageScale(resized=(2, 2), padded=(32, 32), grid=(2, 2))
"""What an unused scale slot computes (a 2x2 corner of the image, padded to one block)."""


@dataclass
class ImageJob:
    """One image to decode: its encoded bytes, the size the index recorded, the output scales."""

    data: bytes
    height: int
    """Decoded height the index records (after EXIF orientation)."""
    width: int
    scales: Sequence[ImageScale]
    """Scales to produce, in output order (smallest first)."""


@dataclass
class DecodeFailure:
    """An image that could not be decoded; `reason` is counted in the skip report."""

    reason: str
    refused: bool = False
    """True: refused from its header before decoding (format, pixel limit)."""


DecodeResult = Union[list[torch.Tensor], DecodeFailure]


@functools.lru_cache(maxsize=1)
def _canary() -> ImageJob:
    """A small valid JPEG (decodes anywhere) for the health check after a failure."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 160, 30)).save(buf, "JPEG")
    return ImageJob(buf.getvalue(), 48, 64, [ImageScale((48, 64), (64, 64), (4, 4))])


def _dali_reason(e: Exception) -> str:
    """The useful line of a DALI operator error (it comes wrapped in a long traceback)."""
    text = str(e)
    tail = text.split("encountered:", 1)[-1].strip() or text.strip()
    return "DALI could not decode it: " + " ".join(tail.split())[:200]


def patchify(hwc: torch.Tensor, padded: tuple[int, int], patch: int, merge: int) -> torch.Tensor:
    """uint8 [H, W, C] image -> uint8 [gh*gw, C*P*P] patches in merge-block order, the image
    zero-padded bottom/right to `padded` (multiples of patch * merge). Always a new tensor."""
    h, w, c = hwc.shape
    ph, pw = padded
    canvas = hwc.new_zeros(ph, pw, c)
    canvas[:h, :w] = hwc
    x = canvas.view(ph // (patch * merge), merge, patch, pw // (patch * merge), merge, patch, c)
    # [bh, mh, ph, bw, mw, pw, c] -> [bh, bw, mh, mw, c, ph, pw] -> [gh*gw, c*P*P]
    return x.permute(0, 3, 1, 4, 6, 2, 5).reshape(-1, c * patch * patch)


def normalize_pixels(patches: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> x / 127.5 - 1 in [-1, 1] (= (x/255 - 0.5) / 0.5; zero padding becomes -1).

    One pass per pack (all images at once) so torch spreads it over its intra-op threads."""
    out = patches.to(torch.float32).mul_(1 / 127.5).sub_(1.0)
    return out if dtype == torch.float32 else out.to(dtype)


def cuda_available() -> bool:
    return torch.cuda.is_available()


class DaliImageDecoder:
    """Decodes, resizes, pads and patchifies batches of `ImageJob`s into uint8 patches."""

    def __init__(
        self,
        max_batch: int,
        num_scales: int,
        num_threads: int = 4,
        device: str = "cpu",
        patch_size: int = 16,
        merge_size: int = 2,
        device_id: Optional[int] = None,
        max_pixels: Optional[int] = None,
    ):
        """`max_pixels`: refuse images whose header declares more pixels (or that are not
        JPEG/PNG/WebP) before decoding; None: no check (images the caller already checked)."""
        if device not in ("cpu", "gpu"):
            raise ValueError(f"decode device must be cpu or gpu, got {device!r}")
        if device == "gpu" and not cuda_available():
            raise RuntimeError("decode_device gpu needs CUDA; use cpu (or auto)")
        self.max_batch, self.num_scales = max_batch, max(1, num_scales)
        self.num_threads, self.device = num_threads, device
        self.patch, self.merge = patch_size, merge_size
        self.max_pixels = max_pixels
        self.device_id = (
            (torch.cuda.current_device() if device_id is None else device_id)
            if device == "gpu"
            else None
        )
        self._pipe = None

    # ------------------------------------------------------------------ pipeline
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        decoder_device = "mixed" if self.device == "gpu" else "cpu"
        width = 3 * self.patch * self.patch

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=self.device_id,
            exec_pipelined=False,
            exec_async=False,
            prefetch_queue_depth=1,
            enable_conditionals=True,
        )
        def pipe():
            data = fn.external_source(name="bytes", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(data, device=decoder_device, output_type=types.RGB)
            # the decoded size, to check against the index; on the GPU path it is produced on
            # the GPU (a GPU->CPU edge inside the graph needs DALI's dynamic executor)
            outs = [img.shape(device="gpu" if self.device == "gpu" else "cpu")]
            for s in range(self.num_scales):
                resize = fn.external_source(name=f"resize{s}", dtype=types.BOOL, ndim=0)
                size = fn.external_source(name=f"size{s}", dtype=types.FLOAT, ndim=1)
                roi = fn.external_source(name=f"roi{s}", dtype=types.FLOAT, ndim=1)
                padded = fn.external_source(name=f"padded{s}", dtype=types.INT32, ndim=1)
                blocks = fn.external_source(name=f"blocks{s}", dtype=types.INT32, ndim=1)
                x = img
                if resize:  # per sample: identity scales skip the resampler
                    x = fn.resize(
                        x,
                        size=size,
                        roi_start=[0.0, 0.0],
                        roi_end=roi,
                        interp_type=types.INTERP_CUBIC,
                        antialias=True,
                    )
                x = fn.pad(x, axes=(0, 1), shape=padded, fill_value=0)
                # [bh, mh, ph, bw, mw, pw, c] -> [bh, bw, mh, mw, c, ph, pw] -> [gh*gw, c*P*P]
                x = fn.transpose(fn.reshape(x, shape=blocks), perm=[0, 3, 1, 4, 6, 2, 5])
                outs.append(fn.reshape(x, shape=[-1, width]))
            return tuple(outs)

        p = pipe()
        p.build()
        return p

    def _reset(self) -> None:
        self._pipe = None  # an operator error leaves a DALI pipeline unusable

    def close(self) -> None:
        self._pipe = None

    # ------------------------------------------------------------------ decoding
    def decode(self, jobs: Sequence[ImageJob]) -> list[DecodeResult]:
        """Per job: its scales' patches (or a DecodeFailure), in job order."""
        if self.max_pixels is None:
            return self._decode(jobs)
        refusals = [check_image_bytes(j.data, self.max_pixels) for j in jobs]
        decoded = iter(self._decode([j for j, r in zip(jobs, refusals) if r is None]))
        return [next(decoded) if r is None else DecodeFailure(r, refused=True) for r in refusals]

    def _decode(self, jobs: Sequence[ImageJob]) -> list[DecodeResult]:
        out: list[DecodeResult] = []
        for i in range(0, len(jobs), self.max_batch):
            chunk = jobs[i : i + self.max_batch]
            try:
                out.extend(self._run(chunk))
            except RuntimeError:
                self._reset()
                for job in chunk:  # isolate the failing image(s)
                    try:
                        out.extend(self._run([job]))
                    except RuntimeError as e:
                        self._reset()
                        self._check_health(e)
                        out.append(DecodeFailure(_dali_reason(e)))
        return out

    def _check_health(self, error: Exception) -> None:
        """Raise if a known-good image fails too: then the pipeline itself is broken (out of
        memory, a driver error), and skipping every image would silently empty the batches."""
        try:
            self._run([_canary()])
        except RuntimeError as e:
            self._reset()
            raise RuntimeError(
                f"DALI fails on a known-good image, so the failure is not the "
                f"data's: {_dali_reason(e)} (first error: {_dali_reason(error)})"
            ) from error

    def _run(self, jobs: Sequence[ImageJob]) -> list[DecodeResult]:
        need = max(len(j.scales) for j in jobs)
        if need > self.num_scales:  # a multi-scale image with more scales than seen so far
            self.num_scales, self._pipe = need, None
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("bytes", [np.frombuffer(j.data, dtype=np.uint8) for j in jobs])
        m, u = self.merge, self.patch * self.merge
        for s in range(self.num_scales):
            # unused slots resize a 2x2 corner into one 32 px block: no real work
            sc = [j.scales[s] if s < len(j.scales) else _SPARE_SCALE for j in jobs]
            real = [s < len(j.scales) for j in jobs]
            feeds = {
                "resize": [
                    not r or c.resized != (j.height, j.width) for j, c, r in zip(jobs, sc, real)
                ],
                "size": [c.resized for c in sc],
                "roi": [
                    (j.height, j.width) if r else _SPARE_SCALE.resized for j, r in zip(jobs, real)
                ],
                "padded": [c.padded for c in sc],
                "blocks": [
                    (c.padded[0] // u, m, self.patch, c.padded[1] // u, m, self.patch, 3)
                    for c in sc
                ],
            }
            for name, values in feeds.items():
                dtype = {"resize": np.bool_, "size": np.float32, "roi": np.float32}.get(
                    name, np.int32
                )
                p.feed_input(f"{name}{s}", [np.asarray(v, dtype=dtype) for v in values])
        outs = p.run()
        shapes = outs[0].as_cpu() if self.device == "gpu" else outs[0]
        # one copy per scale slot: every image's patches back to back, then views per image
        slots = [self._copy_out(o) for o in outs[1:]]
        starts = [np.concatenate([[0], np.cumsum([sh[0] for sh in o.shape()])]) for o in outs[1:]]
        results: list[DecodeResult] = []
        for i, job in enumerate(jobs):
            h, w = (int(v) for v in np.asarray(shapes[i])[:2])
            if (h, w) != (job.height, job.width):
                results.append(
                    DecodeFailure(
                        f"decoded size {h}x{w} differs from the index's {job.height}x{job.width}"
                    )
                )
                continue
            results.append(
                [
                    slots[s][int(starts[s][i]) : int(starts[s][i + 1])]
                    for s in range(len(job.scales))
                ]
            )
        return results

    def _copy_out(self, tensor_list) -> torch.Tensor:
        """A DALI TensorList of [n_i, W] samples -> one torch tensor [sum n_i, W] of our own
        (DALI reuses its buffers on the next run).

        GPU: the tensor is allocated on the caller's current stream (the loader's private one,
        megatron_navil/data/cuda_handoff.py) and DALI copies into it on that same stream, so the
        caching allocator's stream bookkeeping is right. The copy is blocking (DALI 2.4: it
        orders the copy after DALI's own stream, then the host waits for it), so it is complete
        before the next `pipe.run()` may overwrite DALI's buffers; on a private stream that wait
        covers only decode work, never training kernels."""
        rows = sum(int(sh[0]) for sh in tensor_list.shape())
        width = 3 * self.patch * self.patch
        if self.device == "gpu":
            out = torch.empty(
                (rows, width), dtype=torch.uint8, device=torch.device("cuda", self.device_id)
            )
            stream = torch.cuda.current_stream(self.device_id).cuda_stream
            tensor_list.copy_to_external(
                ctypes.c_void_p(out.data_ptr()),
                cuda_stream=ctypes.c_void_p(stream),
                non_blocking=False,
            )
        else:
            out = torch.empty((rows, width), dtype=torch.uint8)
            tensor_list.copy_to_external(ctypes.c_void_p(out.data_ptr()))
        return out
