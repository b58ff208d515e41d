"""The torch backend: DataLoader workers read, decode and crop; the pixel ops run batched where cheapest.

    worker (one per unit of the epoch plan, builds whole batches):
        read samples (seek via the DALI index, or stream the tar) ─► check + decode JPEG (libjpeg-turbo)
        ─► draw parameters (pipeline.data.augment, keyed by sample) ─► per sample and view: box, resize
        (antialiased bilinear, uint8), flip ─► uint8 views (batch, 3, S, S)
    pixel ops (colour, blur, solarise, normalise; ``augment.PixelOps``), batched:
        on a GPU: in the main process, on the device (workers ship uint8 + parameters; per view the crops
        and the parameters cross in one copy each, and nothing is read back: the host never waits)
        on a CPU: in the worker right after cropping, in cache-sized chunks (the "device" is these same
        cores, and the worker holds the crops hot in cache), shipping float views (measured: shipping
        uint8 and normalising in the main process costs more than it saves)

A corrupt sample (bad JPEG, truncated tar, missing component) is skipped and its slot filled with a copy
of a good sample of the same batch, marked padding: batch sizes and counts never change.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:  # torchvision's image IO is deprecated in favour of torchcodec (not a dependency); PIL is the fallback
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg
except ImportError:  # pragma: no cover - depends on the installed torchvision
    tv_decode_jpeg = None

from clusterssl.errors import ClusterSSLError, PipelineError
from clusterssl.pipeline.data.augment import PixelOps, ViewParams, draw_params
from clusterssl.pipeline.data.epoch import PADDING_REPEAT, RankPlan
from clusterssl.pipeline.data.integrity import inspect_jpeg_bytes
from clusterssl.pipeline.data.shardset import (
    IndexedShardReader,
    SampleUnavailable,
    ShardSet,
    StreamShardReader,
    check_sample_index,
    open_reader,
)
from clusterssl.pipeline.data.spec import MultiCropSpec
from clusterssl.shards.format import IMAGE_EXT, LABEL_EXT, decode_int


@dataclass
class WorkerBatch:
    """What a worker hands the main process for batch ``number``."""

    number: int
    views: list[Tensor]
    """float32 normalised views, or uint8 crops when ``pixel_params`` is set."""
    labels: Tensor
    index: Tensor
    """(batch,) int64, PADDING_INDEX for padding."""
    pixel_params: list[ViewParams] | None = None
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    """(where, reason) of every sample skipped in this batch."""

    def pin_memory(self) -> WorkerBatch:
        self.views = [v.pin_memory() for v in self.views]
        self.labels, self.index = self.labels.pin_memory(), self.index.pin_memory()
        return self


def decode_jpeg(data: bytes) -> Tensor:
    """JPEG bytes → (3, H, W) uint8 RGB (gray and CMYK converted); ValueError when undecodable.

    torchvision's libjpeg-turbo decoder (measured 1.4x faster than PIL here); it warns that its image IO
    moves to torchcodec, which is not a dependency, so that one warning is silenced around the call.
    Without it (a future torchvision), PIL decodes.
    """
    if tv_decode_jpeg is None:
        return _decode_with_pil(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return tv_decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
    except RuntimeError as error:
        raise ValueError(str(error).strip().splitlines()[-1]) from None


def _decode_with_pil(data: bytes) -> Tensor:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(str(error)) from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def crop_resize(image: Tensor, top: int, left: int, height: int, width: int, size: int, flip: bool) -> Tensor:
    """The box of a (3, H, W) uint8 image resized to (3, size, size), antialiased bilinear, maybe flipped."""
    crop = image[:, top : top + height, left : left + width].unsqueeze(0)
    # A contiguous channels-last crop takes torch's vectorised uint8 path (measured 1.4x faster).
    crop = crop.contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1) if flip else out


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A tensor that crosses the worker→main queue without a copy (shared memory when in a worker)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class BatchBuilder:
    """Builds any batch of one rank's epoch plan; holds the per-process readers."""

    def __init__(
        self,
        shardset: ShardSet,
        plan: RankPlan,
        spec: MultiCropSpec,
        *,
        seed: int,
        epoch: int,
        pixel_ops_here: bool,
    ) -> None:
        self.shardset, self.plan, self.spec = shardset, plan, spec
        self.seed, self.epoch = seed, epoch
        self.pixel_ops_here = pixel_ops_here
        self.pixel_ops = PixelOps(spec.mean, spec.std)
        self._readers: dict[int, IndexedShardReader | StreamShardReader] = {}
        self._units_seen: set[int] = set()
        self._crop_buffers: dict[tuple[int, ...], Tensor] = {}

    def _reader(self, shard: int) -> IndexedShardReader | StreamShardReader:
        if shard not in self._readers:
            self._readers[shard] = open_reader(self.shardset.shards[shard])
        return self._readers[shard]

    def _announce_unit(self, batch: int) -> None:
        """Tell streaming readers every position this unit will ask for, so they keep what they pass."""
        unit = self.plan.unit_of(batch)
        if unit in self._units_seen:
            return
        self._units_seen.add(unit)
        slots = self.plan.unit_slots(unit, batch)
        shards, positions = self.plan.shard[slots], self.plan.position[slots]
        for shard in np.unique(shards):
            reader = self._reader(int(shard))
            if isinstance(reader, StreamShardReader):
                reader.want(positions[shards == shard])

    def _load(self, slot: int) -> tuple[Tensor, int]:
        """Read, check and decode the sample in ``slot``: (image (3, H, W) uint8, label)."""
        shard_id, position = int(self.plan.shard[slot]), int(self.plan.position[slot])
        shard = self.shardset.shards[shard_id]
        components = self._reader(shard_id).read(position)
        check_sample_index(shard, position, components)
        jpeg = components[IMAGE_EXT]
        info = inspect_jpeg_bytes(jpeg)
        if not info.ok:
            raise SampleUnavailable(shard.where(position), f"bad JPEG ({info.reason})")
        try:
            image = decode_jpeg(jpeg)
            label = decode_int(components[LABEL_EXT])
        except ValueError as error:
            raise SampleUnavailable(shard.where(position), f"bad JPEG ({error})") from None
        return image, label

    def _fallback(self) -> tuple[Tensor, int, int]:
        """A good sample for a batch whose samples are all bad: the rank's first readable one."""
        for slot in np.flatnonzero(~self.plan.padding):
            try:
                image, label = self._load(int(slot))
            except SampleUnavailable:
                continue
            return image, label, int(self.plan.index[slot])
        raise PipelineError("no sample of this rank's share of the epoch can be read: the data is unusable")

    def build(self, batch: int) -> WorkerBatch:
        self._announce_unit(batch)
        span = self.plan.slots(batch)
        slots = np.arange(span.start, span.stop)
        n = len(slots)
        images: list[Tensor | None] = [None] * n
        labels = np.full(n, -1, np.int64)
        index = self.plan.index[slots].copy()
        repeat = self.plan.repeat[slots].copy()
        padding = self.plan.padding[slots].copy()
        corrupt: list[tuple[str, str]] = []
        for i, slot in enumerate(slots):
            try:
                images[i], labels[i] = self._load(int(slot))
            except SampleUnavailable as error:
                if not padding[i]:  # a padding copy's original was counted where it was read
                    corrupt.append((error.where, error.reason))
        good = [i for i in range(n) if images[i] is not None]
        fallback = None if good else self._fallback()
        for k, i in enumerate(i for i in range(n) if images[i] is None):
            if fallback is None:
                source = good[k % len(good)]
                images[i], labels[i], index[i] = images[source], labels[source], index[source]
            else:
                images[i], labels[i], index[i] = fallback
            repeat[i], padding[i] = PADDING_REPEAT + int(slots[i]), True
        views, params = self._views(images, index, repeat)
        return WorkerBatch(
            number=batch,
            views=views,
            labels=torch.from_numpy(labels),
            index=torch.from_numpy(np.where(padding, -1, index)),
            pixel_params=None if self.pixel_ops_here else params,
            corrupt=corrupt,
        )

    def _views(
        self, images: list[Tensor | None], index: np.ndarray, repeat: np.ndarray
    ) -> tuple[list[Tensor], list[ViewParams]]:
        heights = np.array([im.shape[1] for im in images if im is not None])
        widths = np.array([im.shape[2] for im in images if im is not None])
        assert len(heights) == len(images), "every slot holds an image by now"
        params = draw_params(self.spec, self.seed, self.epoch, index, repeat, heights, widths)
        views = []
        for view, p in zip(self.spec.views, params, strict=True):
            n, size = len(images), view.size
            # Crops are channels-last (what the resize writes, 20% cheaper than transposing them). Crops
            # that leave the worker need fresh shared memory; crops finished here reuse one buffer.
            stored = (n, size, size, 3)
            crops = (
                self._crop_buffer(stored) if self.pixel_ops_here else _new_tensor(stored, torch.uint8)
            ).permute(0, 3, 1, 2)
            top, left, height, width, flip = (a.tolist() for a in (p.top, p.left, p.height, p.width, p.flip))
            for i, image in enumerate(images):
                assert image is not None
                crops[i] = crop_resize(image, top[i], left[i], height[i], width[i], size, flip[i])
            if self.pixel_ops_here:
                out = _new_tensor((n, 3, size, size), torch.float32)
                views.append(self.pixel_ops.finish(crops, p, out=out))
            else:
                views.append(crops)
        return views, params

    def _crop_buffer(self, shape: tuple[int, ...]) -> Tensor:
        if shape not in self._crop_buffers:
            self._crop_buffers[shape] = torch.empty(shape, dtype=torch.uint8)
        return self._crop_buffers[shape]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


class _PlanDataset(torch.utils.data.Dataset):
    """Map-style: item j is batch j of the plan, built by whichever worker the DataLoader picks
    (round-robin, so worker i builds the batches of unit (i + start_batch) mod units)."""

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder

    def __len__(self) -> int:
        return self.builder.plan.num_batches

    def __getitem__(self, batch: int) -> WorkerBatch:
        if torch.utils.data.get_worker_info() is not None:  # DataLoader workers run one thread already
            return self.builder.build(batch)
        # In the main process (num_workers=0) the per-sample ops are far too small for intra-op threads:
        # with two threads they ran 10x slower here. Borrow one thread while building, then give back.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.builder.build(batch)
        finally:
            torch.set_num_threads(threads)


def _identity(batch: WorkerBatch) -> WorkerBatch:
    return batch


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGINT to the main process.

    Slurm's scancel and preemption signal the whole process group and Ctrl-C the whole foreground group.
    A worker that died of it first would take the main process down with a DataLoader error before it
    could checkpoint; ignoring the signals lets the main process stop at a step boundary, save, and shut
    its workers down itself (they also exit when it dies).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _unwrapping_worker_errors(loader: Iterator[WorkerBatch]) -> Iterator[WorkerBatch]:
    """The loader's batches; a user error raised in a worker comes back as its own one line.

    The DataLoader re-raises a worker's exception in the main process with the worker's traceback as its
    message ("Caught PipelineError in DataLoader worker process 0. Original Traceback …"), which the CLI
    would print whole instead of the one line the error was raised with.
    """
    try:
        yield from loader
    except ClusterSSLError as error:
        message = worker_error_message(error)
        if message is None:
            raise
        raise type(error)(message) from None


def worker_error_message(error: BaseException) -> str | None:
    """The original message of an exception a DataLoader worker re-raised, or None for any other one.

    The traceback text ends with ``module.ClassName: message``; the message is what follows the name.
    """
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return None
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    _, found, message = last.partition(f"{type(error).__name__}: ")
    return message if found else None


def iterate_torch(
    builder: BatchBuilder,
    *,
    start_batch: int,
    num_workers: int,
    device: torch.device,
) -> Iterator[WorkerBatch]:
    """The rank's batches from ``start_batch`` on, in order, pixel ops applied, views on ``device``."""
    plan = builder.plan
    pixel_ops = PixelOps(builder.spec.mean, builder.spec.std)  # its device constants last the epoch
    if num_workers > 0 and plan.num_units != num_workers:
        raise ValueError("the plan's units must be the DataLoader's workers")
    loader = torch.utils.data.DataLoader(
        _PlanDataset(builder),
        batch_size=None,
        sampler=range(start_batch, plan.num_batches),
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )
    batches = iter(loader)
    try:
        for batch in _unwrapping_worker_errors(batches):
            if batch.pixel_params is not None:
                batch.views = finish_on_device(batch.views, batch.pixel_params, pixel_ops, device)
                batch.pixel_params = None
            else:
                batch.views = [v.to(device, non_blocking=True) for v in batch.views]
            yield batch
    finally:
        _stop_workers(batches)
        builder.close()


def finish_on_device(
    crops: list[Tensor], params: list[ViewParams], pixel_ops: PixelOps, device: torch.device
) -> list[Tensor]:
    """The views of a batch whose pixel ops were left to ``device``: the uint8 crops (pinned by the
    DataLoader on a GPU) are sent without waiting, and the ops are decided from the host's parameters."""
    return [
        pixel_ops.finish(view.to(device, non_blocking=True), view_params)
        for view, view_params in zip(crops, params, strict=True)
    ]


def _stop_workers(batches: Iterator[WorkerBatch]) -> None:
    """Shut the DataLoader's workers down now, whatever ended the iteration.

    The workers ignore SIGTERM (``ignore_stop_signals``), so they must be told to exit: left to the
    iterator's garbage collection, a worker still alive when the interpreter exits (an error's traceback
    keeps the iterator) would survive multiprocessing's terminate() and its join would wait forever.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:  # absent without workers (num_workers=0)
        shutdown()
