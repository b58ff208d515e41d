# clusterssl GPU image: CUDA 13 runtime (from the pip wheels), torch + torchvision, DALI (its wheel carries
# the GPU build), faiss-gpu, MLflow, and clusterssl itself. Everything is installed at build time; the
# container needs no network at run time.
#
#   docker build -t clusterssl .
#   docker run --rm clusterssl                                   # prints the CLI help
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD:/workspace clusterssl \
#       clusterssl train swav_imagenet --set data.train=/data/imagenet-shards/train
# Mount the whole of /workspace: the runs (runs/), the MLflow store (mlflow.db) and its artifacts
# (mlruns/) all live there and would vanish with the --rm container otherwise.
#   docker run --gpus all --ipc=host ... clusterssl \
#       torchrun --standalone --nproc_per_node=8 -m clusterssl train swav_imagenet --set data.train=/data/...
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    CLUSTERSSL_CONFIG_DIR=/opt/clusterssl/configs \
    MLFLOW_TRACKING_URI=sqlite:////workspace/mlflow.db

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tar ca-certificates \
        gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

# The heavy, rarely changing layer first: torch/torchvision (CUDA 13.0 wheels) and faiss for GPUs.
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/clusterssl
COPY pyproject.toml README.md ./
# The repository root is the clusterssl package: its own modules, then the sub-packages.
COPY __init__.py __main__.py config.py errors.py ./
COPY shards ./shards
COPY pipeline ./pipeline
COPY models ./models
COPY tools ./tools
COPY configs ./configs
# The project depends on faiss-cpu (what CI and laptops use); on GPUs swap it for faiss-gpu, which
# installs the same `faiss` module. PyPI has no CUDA 13 build of faiss (no faiss-gpu-cu13): Meta's
# faiss-gpu wheel links the CUDA 12 runtime and cuBLAS it pulls in as nvidia-*-cu12 wheels, so it runs
# beside torch's CUDA 13 libraries and needs only a driver that supports CUDA 12.x, which every CUDA 13
# driver does. (faiss-gpu rather than faiss-gpu-cu12: the latter has no recent wheel for this image's Python
# 3.12 and would fall back to 1.9.0, which pins numpy < 2.)
# `pip install .` also compiles the converter's C loop (shards/_packer.c → clusterssl.shards._packer;
# gcc and python3-dev above).
RUN pip install . \
    && python -c "import clusterssl.shards._packer" \
    && pip uninstall -y faiss-cpu \
    && pip install "faiss-gpu>=1.15.1" \
    && python -c "import faiss, nvidia.dali, mlflow, torch, torchvision, clusterssl.tools.cli"

WORKDIR /workspace
CMD ["clusterssl", "--help"]
