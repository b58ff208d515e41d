"""`clusterssl bench gpu`: what a GPU machine does with this project, in one command of a few minutes.

Parts, each measured on generated data (nothing is downloaded) or skipped with the reason:

- **loader**: images/s of the multi-crop loader for the torch and DALI backends (DALI decodes with nvJPEG,
  ``mixed``, when the views go to a GPU), beside the decode-only ceiling of the same run;
- **train/<method>**: optimizer steps/s and images/s of every method with the backbone and multi-crop views
  of its ImageNet recipe (``configs/<method>_imagenet.yaml``: ResNet-50 at 224 px, ViT-S/16 for DINO and
  iBOT) in bf16, the achieved TFLOP/s (backbone forward and backward, counted with torch's FLOP counter)
  next to the device's peak, and the peak GPU memory. The step is ``bench train``'s (synthetic views, the
  trainer's optimizer step); the clustering methods first cluster a bank of ``BANK_SAMPLES`` synthetic
  images, untimed, with their k lowered to fit it (``BANK_SETTINGS``);
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
METHODS = ("swav", "deepcluster", "deepcluster_v2", "pcl", "dino", "ibot")
"""Every method, each timed with its ImageNet recipe's backbone and views."""
BANK_SAMPLES = 4096
"""Synthetic images the clustering methods embed and cluster before their first step."""
BANK_SETTINGS: dict[str, dict[str, Any]] = {
    "deepcluster": {"num_clusters": 1000},
    "deepcluster_v2": {"num_prototypes": [1000, 1000, 1000]},
    "pcl": {"num_clusters": [500, 1000, 2000]},
}
"""k within the synthetic bank (the recipes' 3,000 to 100,000 need a real dataset). A step's cost depends
on k only through the prototype scores, a (batch x k) matmul: DeepCluster-v2's and PCL's figures are for
these k, DeepCluster's (a linear classifier of k outputs) nearly the same at any k."""
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
        # two images, halved: batch norm in training mode refuses one image on a 1 x 1 map
        images = torch.empty(2, channels, size, size, device="meta")
        counter = FlopCounterMode(display=False)
        with counter:
            meta(images).float().sum().backward()
        total += counter.get_total_flops()
    return total / 2


def _to_meta(module: nn.Module) -> nn.Module:
    import copy

    meta = copy.deepcopy(module).to("meta")
    meta.train()
    return meta


@dataclass(frozen=True)
class Recipe:
    """What a method's ImageNet config trains: backbone, multi-crop views and method settings."""

    backbone: str
    spec: Any  # MultiCropSpec
    settings: dict[str, Any]
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


def imagenet_recipe(method: str) -> Recipe:
    """The backbone, views and method section of ``configs/<method>_imagenet.yaml``, with the k of a
    clustering method lowered to fit the synthetic bank."""
    from clusterssl.config import read_yaml, resolve_config_path
    from clusterssl.pipeline.train.train_config import build_train_config

    config = read_yaml(resolve_config_path(f"{method}_imagenet"))
    built = build_train_config(config)
    settings = {k: v for k, v in config["method"].items() if k != "name"}
    return Recipe(
        built.model.backbone, built.augment.to_spec(), {**settings, **BANK_SETTINGS.get(method, {})}
    )


def view_sizes(method: str) -> list[int]:
    """The sizes of the multi-crop views of a method's ImageNet recipe, globals first."""
    return list(imagenet_recipe(method).spec.sizes)


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
        ("train", lambda: [measure_training(m, device, steps, batch_size, peak, progress) for m in methods]),
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
    method: str,
    device: torch.device,
    steps: int,
    batch_size: int,
    peak: float | None,
    progress: bool = False,
    *,
    recipe: Recipe | None = None,
    bank_samples: int = BANK_SAMPLES,
) -> Part:
    """``bench train``'s timed step for ``method`` under bf16 autocast on ``device``, 2 warm-up steps
    first; ``recipe`` replaces the ImageNet one (tests use small ones on the CPU)."""
    from clusterssl.models.factory import build_method
    from clusterssl.tools.bench_train import synthetic_batch, time_training

    recipe = recipe or imagenet_recipe(method)
    model = build_method(method, recipe.backbone, recipe.settings, recipe.backbone_kwargs)
    batch = synthetic_batch(recipe.spec, batch_size, device, seed=0)
    eval_size = recipe.spec.sizes[0]
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(bank_samples, 3, eval_size, eval_size, generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_training(
        model,
        batch,
        optimizer_name="sgd",
        precision="bf16",
        steps=steps,
        warmup=2,
        bank_images=bank,
        label=method,
        progress=progress,
    )
    flops = training_flops(model.backbone, recipe.spec.sizes) / timing.seconds_per_step * batch_size
    figures = {
        "backbone": recipe.backbone,
        "views": recipe.spec.describe(),
        "steps_per_s": round(1 / timing.seconds_per_step, 2),
        "images_per_s": round(timing.images_per_s, 1),
        "tflops": round(flops / 1e12, 1),
        "peak_tflops": peak,
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        ),
    }
    return Part(f"train/{method}", figures)


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
    "--methods", default=",".join(METHODS), show_default=True, help="Methods whose training step is timed."
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
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise click.UsageError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    summary = run_benchmark(
        methods=chosen,
        steps=steps,
        batch_size=batch_size,
        loader_images=loader_images,
        skip=[s for s in skip.split(",") if s.strip()],
        progress=not as_json,
    )
    emit(summary, as_json, render)
