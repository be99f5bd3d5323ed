# GPU image: CUDA build of torch, the project, the embedded backbones. Entry point: train.py.
#   docker build -t recsys .
#   docker run --gpus all -v $PWD/outputs:/app/outputs recsys trainer=gpu data=amazon data.root=/data/amazon
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.txt requirements-embedded.txt ./
# the CUDA build of the pinned torch, then everything else (torch already satisfied)
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install -r requirements.txt \
    && pip install --no-deps -r requirements-embedded.txt
COPY . .
ENTRYPOINT ["python", "train.py"]
CMD ["trainer=gpu"]
