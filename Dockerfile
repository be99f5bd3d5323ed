# GPU image: the base image's own Python 3.12, the CUDA 12.8 build of the pinned torch (its wheels bring
# the CUDA libraries; the host needs only the NVIDIA driver and the container toolkit), the package with
# its console scripts, and the embedded backbones. Runs as a non-root user; outputs, adapters, caches
# and data are volumes.
#   docker build -t recsys .
#   docker run --gpus 1 -v $PWD/outputs:/work/outputs -v $PWD/artifacts:/work/artifacts recsys trainer=gpu
#   docker run --gpus all --shm-size 8g -v ... recsys trainer=ddp trainer.devices=4
FROM python:3.12-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RECSYS_CACHE=/cache/recsys \
    HF_HOME=/cache/huggingface \
    RECSYS_DATA=/data

WORKDIR /opt/recsys
# the CUDA build of the locked torch (requirements.lock) first: `pip install .` then finds torch==2.13.0 satisfied
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY requirements-embedded.txt ./
RUN pip install --no-cache-dir --no-deps -r requirements-embedded.txt
COPY pyproject.toml README.md requirements.lock ./
COPY recsys ./recsys
COPY conf ./conf
COPY hydra_plugins ./hydra_plugins
RUN pip install --no-cache-dir -c requirements.lock .

RUN useradd --create-home --uid 1000 --user-group recsys \
    && mkdir -p /work/outputs /work/artifacts /cache /data \
    && chown -R 1000:1000 /work /cache /data
USER 1000:1000
WORKDIR /work
VOLUME ["/work/outputs", "/work/artifacts", "/cache", "/data"]
ENTRYPOINT ["recsys-train"]
CMD ["trainer=gpu"]
