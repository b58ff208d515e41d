"""GPU-path choices that can be checked on a CPU with torch.cuda mocked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clusterssl.pipeline.data.loader import default_device


def test_the_loader_default_device_is_the_local_ranks_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name in ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert default_device() == torch.device("cuda", 2)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_compile_with_sync_batchnorm_is_refused_in_one_line(tmp_path: Path) -> None:
    from trainer_helpers import tiny_config

    from clusterssl.errors import PipelineError
    from clusterssl.pipeline.train.train_config import build_train_config

    config = tiny_config(tmp_path, tmp_path, model={"sync_batchnorm": True}, trainer={"compile": True})
    with pytest.raises(PipelineError, match="set one of them to false") as refused:
        build_train_config(config)
    assert "\n" not in str(refused.value)
    build_train_config({**config, "trainer": {**config["trainer"], "compile": False}})


def test_a_gpu_machine_with_cpu_only_faiss_is_told(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import faiss

    from clusterssl.models.clustering import kmeans

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    points = torch.randn(200, 4).numpy()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="clusterssl.models.clustering"):
        kmeans(points, 3, niter=2)
    assert "faiss sees no GPU" not in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING", logger="clusterssl.models.clustering"):
        kmeans(points, 3, niter=2, init="kmeans++")
    assert "CUDA works but faiss sees no GPU" in caplog.text and "pip install faiss-gpu" in caplog.text


def test_cuda_runs_switch_on_cudnn_benchmark_and_tf32() -> None:
    from clusterssl.pipeline.train.cuda_runtime import configure_cuda

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32)
    try:
        cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = False, False, False
        configure_cuda(torch.device("cpu"))
        assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == (False, False, False)
        configure_cuda(torch.device("cuda", 1))
        assert (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32) == (True, True, True)
    finally:  # process-wide switches: leave them as the other tests expect
        cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_faiss_clusters_on_the_calling_ranks_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss-gpu seeing 4 GPUs, torch's current device 2 (the rank's, set by the process group): every
    index k-means builds goes to GPU 2 alone, never to all of them. The placement is faked so that the
    CPU index still runs the clustering here."""
    import faiss

    from clusterssl.models import clustering

    placed: list[int] = []

    def to_gpu(resources: object, device: int, index: object) -> object:
        placed.append(device)
        return index

    def to_all_gpus(index: object, ngpu: int = -1) -> object:
        raise AssertionError("an index was spread over every GPU")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    clustering._gpu_resources.cache_clear()
    try:
        assert clustering.process_gpu() == 2
        result = clustering.kmeans(torch.randn(200, 4).numpy(), 3, niter=2, init="kmeans++")
    finally:
        clustering._gpu_resources.cache_clear()  # holds the fake resources
    assert result.assignments.shape == (200,)
    assert placed and set(placed) == {2}  # the Lloyd index and the final assignment's
    cpu_index = faiss.IndexFlatL2(4)
    assert clustering.on_gpus(cpu_index, 0) is cpu_index  # no GPU asked for: the index stays on the CPU
