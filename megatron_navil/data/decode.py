"""Image decoding with NVIDIA DALI: bytes -> per-scale patches [gh*gw, 3*P*P] in [-1, 1].

One DALI pipeline per loader, fed by `fn.external_source` with the encoded bytes the loader
read by index offset (multi-image samples are not matched by DALI's webdataset reader):

    bytes -> decoders.image (device "cpu", or "mixed" = nvJPEG/HW decoder on the GPU), RGB,
             EXIF orientation applied (DALI default; the index records post-rotation sizes)
          -> per scale s (S slots): resize to the NaViL size (bicubic, antialiased, uint8 out,
             like PIL's BICUBIC resize of the release) -> crop_mirror_normalize: (x - 127.5) /
             127.5, CHW float32, window grown bottom/right to the 32 px-padded size with fill -1
             (padding applied before normalisation in the release = -1 after it)
    torch: patchify [3, gh*P, gw*P] -> [gh/2, gw/2, 2, 2, 3, P, P] -> [gh*gw, 3*P*P]
           (merge-block order, each patch flattened (c, ph, pw))
The pipeline has a fixed number S of scale slots (the most scales any image of the data has);
an image with fewer scales resizes a 2x2 region of itself into the spare slots (negligible work).

Failures: DALI invalidates a pipeline after any operator error, so on an error the pipeline is
rebuilt and the batch decoded image by image to find the culprits; an image whose decoded size
differs from the index is a failure too (the token layout was planned from the index sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megatron_navil.data.layout import ImageScale

_SPARE = (2.0, 2.0)  # size/ROI/crop of an unused scale slot


@dataclass
class ImageJob:
    data: bytes
    height: int
    """Decoded height the index records (after EXIF orientation)."""
    width: int
    scales: Sequence[ImageScale]
    """Scales to produce, in output order (smallest first)."""


@dataclass
class DecodeFailure:
    reason: str


DecodeResult = Union[list[torch.Tensor], DecodeFailure]


def _dali_reason(e: Exception) -> str:
    """The useful line of a DALI operator error (it comes wrapped in a long traceback)."""
    text = str(e)
    tail = text.split("encountered:", 1)[-1].strip() or text.strip()
    return "DALI could not decode it: " + " ".join(tail.split())[:200]


def patchify(chw: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """[C, gh*P, gw*P] -> [gh*gw, C*P*P] in merge-block order (gh/m, gw/m, m, m)."""
    c, height, width = chw.shape
    gh, gw = height // patch, width // patch
    x = chw.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
    # [c, bh, mh, ph, bw, mw, pw] -> [bh, bw, mh, mw, c, ph, pw]
    x = x.permute(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(gh * gw, c * patch * patch)


def cuda_available() -> bool:
    return torch.cuda.is_available()


class DaliImageDecoder:
    """Decodes, resizes, normalises, pads and patchifies batches of `ImageJob`s."""

    def __init__(self, max_batch: int, num_scales: int, num_threads: int = 4,
                 device: str = "cpu", patch_size: int = 16, merge_size: int = 2,
                 pixel_dtype: torch.dtype = torch.float32, device_id: Optional[int] = None):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"decode device must be cpu or gpu, got {device!r}")
        if device == "gpu" and not cuda_available():
            raise RuntimeError("decode_device gpu needs CUDA; use cpu (or auto)")
        self.max_batch, self.num_scales = max_batch, max(1, num_scales)
        self.num_threads, self.device = num_threads, device
        self.patch, self.merge, self.pixel_dtype = patch_size, merge_size, pixel_dtype
        self.device_id = (torch.cuda.current_device() if device_id is None else device_id) \
            if device == "gpu" else None
        self._pipe = None

    # ------------------------------------------------------------------ pipeline
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        decoder_device = "mixed" if self.device == "gpu" else "cpu"

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=self.device_id, exec_pipelined=False, exec_async=False,
                      prefetch_queue_depth=1)
        def pipe():
            data = fn.external_source(name="bytes", dtype=types.UINT8, ndim=1)
            img = fn.decoders.image(data, device=decoder_device, output_type=types.RGB)
            # the decoded size, to check against the index; on the GPU path it is produced on
            # the GPU (a GPU->CPU edge inside the graph needs DALI's dynamic executor)
            outs = [img.shape(device="gpu" if self.device == "gpu" else "cpu")]
            for s in range(self.num_scales):
                size = fn.external_source(name=f"size{s}", dtype=types.FLOAT, ndim=1)
                roi = fn.external_source(name=f"roi{s}", dtype=types.FLOAT, ndim=1)
                crop = fn.external_source(name=f"crop{s}", dtype=types.FLOAT, ndim=1)
                resized = fn.resize(img, size=size, roi_start=[0.0, 0.0], roi_end=roi,
                                    interp_type=types.INTERP_CUBIC, antialias=True)
                outs.append(fn.crop_mirror_normalize(
                    resized, crop=crop, crop_pos_x=0.0, crop_pos_y=0.0,
                    out_of_bounds_policy="pad", fill_values=[-1.0], mean=[127.5] * 3,
                    std=[127.5] * 3, output_layout="CHW", dtype=types.FLOAT))
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
        out: list[DecodeResult] = []
        for i in range(0, len(jobs), self.max_batch):
            chunk = jobs[i:i + self.max_batch]
            try:
                out.extend(self._run(chunk))
            except RuntimeError:
                self._reset()
                for job in chunk:  # isolate the failing image(s)
                    try:
                        out.extend(self._run([job]))
                    except RuntimeError as e:
                        self._reset()
                        out.append(DecodeFailure(_dali_reason(e)))
        return out

    def _run(self, jobs: Sequence[ImageJob]) -> list[DecodeResult]:
        if self._pipe is None:
            self._pipe = self._build()
        p = self._pipe
        p.feed_input("bytes", [np.frombuffer(j.data, dtype=np.uint8) for j in jobs])
        for s in range(self.num_scales):
            for name, get in (("size", lambda sc: sc.resized), ("crop", lambda sc: sc.padded)):
                p.feed_input(f"{name}{s}", [np.asarray(get(j.scales[s]) if s < len(j.scales)
                                                       else _SPARE, dtype=np.float32)
                                            for j in jobs])
            p.feed_input(f"roi{s}", [np.asarray((j.height, j.width) if s < len(j.scales)
                                                else _SPARE, dtype=np.float32) for j in jobs])
        outs = p.run()
        shapes = outs[0].as_cpu() if self.device == "gpu" else outs[0]
        results: list[DecodeResult] = []
        for i, job in enumerate(jobs):
            h, w = (int(v) for v in np.asarray(shapes[i])[:2])
            if (h, w) != (job.height, job.width):
                results.append(DecodeFailure(
                    f"decoded size {h}x{w} differs from the index's {job.height}x{job.width}"))
                continue
            results.append([self._patches(outs[1 + s][i]) for s in range(len(job.scales))])
        return results

    def _patches(self, tensor) -> torch.Tensor:
        if self.device == "gpu":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            chw = torch.empty(tuple(tensor.shape()), dtype=torch.float32,
                              device=torch.device("cuda", self.device_id))
            feed_ndarray(tensor, chw, cuda_stream=torch.cuda.current_stream(self.device_id))
        else:
            chw = torch.from_numpy(np.asarray(tensor))  # view of DALI's buffer
        patches = patchify(chw, self.patch, self.merge)
        if patches.untyped_storage().data_ptr() == chw.untyped_storage().data_ptr():
            patches = patches.clone()  # a view of DALI's buffer, which the next run reuses
        return patches.to(self.pixel_dtype)
