"""The classifier task: images (encoded bytes or tensors) checked against the limits, decoded in a worker pool
off the event loop, batched into one backend call."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from transerve.preprocessing import ImagePreprocessing
from transerve.server.backends.runner import GraphRunner
from transerve.server.engine.loaded_model import Limits, LoadedModel
from transerve.server.engine.model_config import ModelConfig
from transerve.server.exceptions import ConfigError, RequestError


class ClassifierModel(LoadedModel):
    computes_inline = True

    def __init__(self, config: ModelConfig, version: str, backend: str, runners: dict[str, GraphRunner],
                 entry: Path, on_batch: Any, image_pool: ThreadPoolExecutor, limits: Limits) -> None:
        super().__init__(config, version, backend, runners, on_batch)
        try:
            self.preprocessing = ImagePreprocessing.from_config(dict(config.preprocessing or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{entry / 'config.yaml'}: {e}") from None
        labels_file = entry / (config.labels or "labels.txt")
        self.labels = read_labels(labels_file)
        self.input_shape = tuple(config.inputs[0].dims[1:])
        self.image_pool, self.limits = image_pool, limits
        self.decoding = 0  # images being decoded now (not yet queued), counted by the admission check

    def _run_batch(self, payloads: list[np.ndarray]) -> list[np.ndarray]:
        if len(payloads) == 1:  # the common case at low load: no copies, no split
            return [self.runners["model"].run(None, {"images": payloads[0]})[0]]
        logits = self.runners["model"].run(None, {"images": np.concatenate(payloads)})[0]
        return list(np.split(logits, np.cumsum([len(p) for p in payloads])[:-1]))

    def check_tensor(self, images: np.ndarray, field: str, batched: bool = False) -> np.ndarray:
        """``images`` as ``[N, C, H, W]`` float32, finite, N within the batch limit; ``batched`` (KServe's
        ``inputs.images``) requires the batch dimension, a single image's tensor may leave it out."""
        if images.ndim == 3 and not batched:
            images = images[None]
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise RequestError(f"{field}: shape {list(images.shape)} does not match [N, "
                               f"{', '.join(map(str, self.input_shape))}]")
        if images.dtype != np.float32:
            raise RequestError(f"{field}: datatype {images.dtype} must be float32 (FP32)")
        if not 1 <= len(images) <= self.config.max_batch_size:
            raise RequestError(f"{field}: batch of {len(images)} images, the limit is {self.config.max_batch_size}")
        if not np.isfinite(images).all():  # NaN/Inf would come back as NaN scores, or poison a shared batch
            raise RequestError(f"{field}: holds NaN or Inf values; pixels must be finite")
        return images

    def decode_image(self, data: bytes, field: str) -> np.ndarray:
        if len(data) > self.limits.max_image_bytes:
            raise RequestError(f"{field}: {len(data)} bytes exceed the limit of {self.limits.max_image_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                pixels = width * height
                if pixels > self.limits.max_image_pixels:
                    raise RequestError(f"{field}: {width}×{height} = {pixels} pixels exceed the "
                                       f"limit of {self.limits.max_image_pixels}")
                resized = self.preprocessing.resized_shape(height, width)  # a 1 × 4000 strip, shortest edge to 256
                if resized[0] * resized[1] > self.limits.max_image_pixels:
                    raise RequestError(f"{field}: {width}×{height} would be resized to {resized[1]}×{resized[0]}, "
                                       f"more than the limit of {self.limits.max_image_pixels} pixels (aspect ratio "
                                       "too extreme for this model's resize)")
                image.load()
                return self.preprocessing.apply_one(image)
        except Image.DecompressionBombError:  # Pillow's own guard, past twice its warning size
            raise RequestError(f"{field}: the image's header claims more pixels than the limit of "
                               f"{self.limits.max_image_pixels}") from None
        except RequestError:
            raise
        except Exception as e:  # whatever a decoder raises on hostile bytes is the client's bad image
            raise RequestError(f"{field}: not a decodable image ({type(e).__name__})") from None

    async def decode_images(self, blobs: list[bytes], field: str) -> np.ndarray:
        """Decode off the event loop — after an admission check that counts the images still being decoded,
        so that under overload a request the queue would shed is refused before its decoding costs anything."""
        self.batcher.check_admission(len(blobs) + self.decoding)
        loop = asyncio.get_running_loop()
        self.decoding += len(blobs)
        try:
            arrays = await asyncio.gather(*(loop.run_in_executor(self.image_pool, self.decode_image, b,
                                                                 f"{field}[{i}]") for i, b in enumerate(blobs)))
        finally:
            self.decoding -= len(blobs)
        return np.stack(arrays)

    async def logits(self, images: np.ndarray, deadline: float | None) -> np.ndarray:
        result: np.ndarray = await self.batcher.submit(images, size=len(images), deadline=deadline)
        return result

    async def warm_up(self) -> None:
        await self.logits(np.zeros((1, *self.input_shape), np.float32), None)


def read_labels(path: Path) -> list[str]:
    """Line i is class i's label; a last line without its newline is a label too (no file: no labels)."""
    return path.read_text().splitlines() if path.is_file() else []
