"""`clusterssl bench gpu`: what a GPU machine does with this project, in one command of a few minutes.

Parts, each measured on generated data (nothing is downloaded) or skipped with the reason:

- **loader**: images/s of the multi-crop loader for the torch and DALI backends (DALI decodes with nvJPEG,
  ``mixed``, when the views go to a GPU), beside the decode-only ceiling of the same run;
- **train/<method>**: optimizer steps/s and images/s at ResNet-50 224 px (ViT-S/16 for DINO) in bf16, the
  achieved TFLOP/s (backbone forward and backward, counted with torch's FLOP counter) next to the
  device's peak, and the peak GPU memory;
- **faiss**: k-means on the GPU against the CPU on the same points;
- **ddp**: one DDP training step in a 1-process NCCL group (the collective path, without a second GPU).

Without a GPU it says so, lists what it would have measured, and exits 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import click
import torch
from torch import nn

from clusterssl.tools.options import emit, json_option

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity); most specific names first
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
)
METHOD_BACKBONES = {"swav": "resnet50", "dino": "vit_small"}
"""The methods a step can be timed for on random images. DeepCluster, DeepCluster-v2 and PCL need a
clustering of the data before their first step; `smoke` checks of a short epoch cover them."""
NEEDS_CLUSTERING = ("deepcluster", "deepcluster_v2", "pcl")
PARTS = ("loader", "train", "faiss", "ddp")


@dataclass
class Part:
    """One line of the table: its figures, or why it was not measured."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (None when the name is not in the table)."""
    for marker, peak in PEAK_BF16_TFLOPS:
        if marker.lower() in device_name.lower():
            return peak
    return None


def training_flops(module: nn.Module, view_sizes: Sequence[int], channels: int = 3) -> float:
    """FLOPs of one image's forward and backward through ``module`` over views of the given sizes
    (counted on the meta device: nothing is computed and no memory is used)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = _to_meta(module)
    total = 0
    for size in view_sizes:
        images = torch.empty(1, channels, size, size, device="meta")
        counter = FlopCounterMode(display=False)
        with counter:
            meta(images).float().sum().backward()
        total += counter.get_total_flops()
    return float(total)


def _to_meta(module: nn.Module) -> nn.Module:
    import copy

    meta = copy.deepcopy(module).to("meta")
    meta.train()
    return meta


def view_sizes(method: str) -> list[int]:
    """The multi-crop views of a method's ImageNet preset: 2 × 224 plus its local crops."""
    from clusterssl.pipeline.data.spec import MultiCropSpec

    return [view.size for view in MultiCropSpec.preset("dino" if method == "dino" else "swav").views]


def no_gpu_parts(reason: str) -> list[Part]:
    return [Part(name, skipped=reason) for name in PARTS]


def run_benchmark(
    *,
    methods: Sequence[str],
    steps: int,
    batch_size: int,
    loader_images: int,
    skip: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Every part on the first GPU; a summary with the device, its peak and one entry per part."""
    if not torch.cuda.is_available():
        return {
            "device": None,
            "peak_bf16_tflops": None,
            "parts": [asdict(p) for p in no_gpu_parts("no CUDA GPU visible to torch on this machine")],
        }
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    parts: list[Part] = []
    measures: list[tuple[str, Callable[[], list[Part]]]] = [
        ("loader", lambda: measure_loaders(device, loader_images, batch_size, progress)),
        ("train", lambda: [measure_training(m, device, steps, batch_size, peak) for m in methods]),
        ("faiss", lambda: [measure_faiss()]),
        ("ddp", lambda: [measure_ddp_step(device, batch_size)]),
    ]
    for part, measure in measures:
        if part in skip:
            parts.append(Part(part, skipped="--skip asked for it"))
            continue
        try:
            parts.extend(measure())
        except Exception as error:  # one failing part must not hide the others' figures
            parts.append(Part(part, skipped=f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"))
    parts.extend(
        Part(f"train/{m}", skipped="needs a clustering pass before its first step") for m in NEEDS_CLUSTERING
    )
    return {
        "device": name,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "parts": [asdict(p) for p in parts],
    }


def measure_loaders(device: torch.device, images: int, batch_size: int, progress: bool) -> list[Part]:
    from clusterssl.pipeline.data.dali_backend import dali_available
    from clusterssl.pipeline.data.spec import MultiCropSpec
    from clusterssl.tools.bench_loader import generated_shards
    from clusterssl.tools.bench_loader import run_benchmark as loader_benchmark

    spec = MultiCropSpec.preset("swav")
    parts = []
    with generated_shards(images) as shards:
        for backend in ("torch", "dali"):
            if backend == "dali" and not dali_available():
                parts.append(Part("loader/dali", skipped="nvidia-dali is not installed"))
                continue
            summary = loader_benchmark(
                shards,
                backend=backend,
                spec=spec,
                batch_size=batch_size,
                num_workers=8,
                batches=max(1, images // batch_size),
                warmup=2,
                device=device,
                progress=progress,
            )
            parts.append(
                Part(
                    f"loader/{backend}",
                    {
                        "images_per_s": summary["images_per_s"],
                        "decode_only_images_per_s": summary["decode_only_images_per_s"],
                    },
                )
            )
    return parts


def measure_training(
    method: str, device: torch.device, steps: int, batch_size: int, peak: float | None
) -> Part:
    from clusterssl.models.factory import build_method
    from clusterssl.models.types import Batch
    from clusterssl.pipeline.train.optim import OptimizerStep

    backbone = METHOD_BACKBONES[method]
    model = build_method(method, backbone).to(device).to(memory_format=torch.channels_last)
    optimizer = OptimizerStep(torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    sizes = view_sizes(method)
    views = [
        torch.randn(batch_size, 3, s, s, device=device).to(memory_format=torch.channels_last) for s in sizes
    ]
    batch = Batch(views, None, torch.arange(batch_size, device=device), num_global=2)
    context = _StepContext(steps_per_epoch=steps + 2, device=device, num_samples=batch_size)
    torch.cuda.reset_peak_memory_stats(device)

    def step(number: int) -> None:
        context.step = number
        with torch.autocast("cuda", dtype=torch.bfloat16):
            output = model(batch, context)
        optimizer(output.loss, model, context)
        model.on_step_end(context)

    for number in range(2):  # warm-up: cuDNN algorithm choice, allocator
        step(number)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for number in range(steps):
        step(2 + number)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    flops = training_flops(model.backbone, sizes) * batch_size * steps
    figures = {
        "backbone": backbone,
        "steps_per_s": round(steps / seconds, 2),
        "images_per_s": round(steps * batch_size / seconds, 1),
        "tflops": round(flops / seconds / 1e12, 1),
        "peak_tflops": peak,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
    }
    return Part(f"train/{method}", figures)


@dataclass
class _StepContext:
    """The run position the methods' hooks read (epoch 0, the step given)."""

    steps_per_epoch: int
    device: torch.device
    num_samples: int
    epoch: int = 0
    step: int = 0
    epochs: int = 100
    rank: int = 0
    world_size: int = 1


def measure_faiss(samples: int = 200_000, dim: int = 128, k: int = 1000) -> Part:
    import faiss

    from clusterssl.models.clustering import kmeans
    from clusterssl.tools.bench_kmeans import gaussian_mixture

    if (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0) == 0:
        return Part("faiss", skipped=faiss_gpu_hint())
    points, _ = gaussian_mixture(samples, dim, k, 1.0, seed=0)
    timings = {}
    for label, gpu in (("gpu", 1), ("cpu", False)):
        started = time.perf_counter()
        kmeans(points, k, niter=10, gpu=gpu)
        timings[f"{label}_s"] = round(time.perf_counter() - started, 2)
    timings["speedup"] = round(timings["cpu_s"] / timings["gpu_s"], 1)
    return Part("faiss", {"data": f"{samples} x {dim}, k={k}, 10 iterations", **timings})


def faiss_gpu_hint() -> str:
    return (
        "faiss sees no GPU although CUDA works: faiss-cpu is installed (or faiss-gpu's CUDA libraries are "
        "missing); k-means runs on the CPU"
    )


def measure_ddp_step(device: torch.device, batch_size: int) -> Part:
    import torch.distributed as dist

    from clusterssl.models.backbones import create_backbone

    if dist.is_initialized():
        return Part("ddp", skipped="a process group already exists in this process")
    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(
            create_backbone("resnet50").to(device), device_ids=[device.index]
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        images = torch.randn(batch_size, 3, 224, 224, device=device)
        times = []
        for _ in range(4):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(images).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return Part("ddp", {"step_ms": round(1000 * min(times[1:]), 1), "backend": "nccl", "world_size": 1})
    finally:
        dist.destroy_process_group()


def render(summary: Mapping[str, Any]) -> str:
    if summary["device"] is None:
        lines = ["no GPU: nothing measured"]
    else:
        peak = summary["peak_bf16_tflops"]
        lines = [f"{summary['device']} (bf16 peak {peak if peak else 'unknown'} TFLOP/s)"]
    for part in summary["parts"]:
        if part["skipped"]:
            lines.append(f"  {part['name']:<22} skipped: {part['skipped']}")
        else:
            figures = "  ".join(f"{k}={v}" for k, v in part["figures"].items())
            lines.append(f"  {part['name']:<22} {figures}")
    return "\n".join(lines)


@click.command()
@click.option(
    "--methods", default="swav,dino", show_default=True, help="Methods whose training step is timed."
)
@click.option(
    "--steps", default=20, show_default=True, help="Timed training steps per method (after 2 warm-up)."
)
@click.option("--batch-size", default=64, show_default=True, help="Images per step (per GPU).")
@click.option("--loader-images", default=2048, show_default=True, help="Generated JPEGs for the loader part.")
@click.option("--skip", default="", help=f"Comma-separated parts to leave out: {', '.join(PARTS)}.")
@json_option
def gpu_command(
    methods: str, steps: int, batch_size: int, loader_images: int, skip: str, as_json: bool
) -> None:
    """Loader, training, faiss and DDP figures of this machine's first GPU, in one table (a few minutes).
    Without a GPU it says so and exits 0."""
    chosen = [m for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHOD_BACKBONES]
    if unknown:
        raise click.UsageError(
            f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHOD_BACKBONES)}"
        )
    summary = run_benchmark(
        methods=chosen,
        steps=steps,
        batch_size=batch_size,
        loader_images=loader_images,
        skip=[s for s in skip.split(",") if s.strip()],
        progress=not as_json,
    )
    emit(summary, as_json, render)
