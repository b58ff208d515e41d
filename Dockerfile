# Minimal image for now; the GPU image (CUDA, DALI GPU build, faiss-gpu) comes with the scale-out work.
FROM python:3.11-slim
WORKDIR /opt/clusterssl
COPY . .
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 && pip install --no-cache-dir .
CMD ["clusterssl", "--help"]
