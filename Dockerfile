# syntax=docker/dockerfile:1
# Serving image: the `serve` extra only (ONNX Runtime on the CPU, numpy/scipy, ZeroMQ, Prometheus client; no torch,
# no Pyro, no training code paths: 344 MiB of site-packages against 1,213 MiB with CPU torch, README "Installs").
# The image runs the ONNX backend on the CPU; the TorchScript backend and CUDA need torch (`.[gpu]`) and say so.
# Build:  docker build -t atomstream:serve .
#         (--build-arg PIP_EXTRA_INDEX_URL=<index> for a package mirror.)
# Run:    docker run --rm -v "$PWD/artifact:/artifact:ro" -v "$PWD/keys:/keys:ro" \
#           -p 5555:5555 -p 5556:5556 -p 5557:5557 -p 127.0.0.1:9108:9108 atomstream:serve
#         By default the sockets listen on every interface of the container *with CurveZMQ on*
#         (deploy/serve-curve.yaml: keys under /keys, one folder of public keys per role); without keys it refuses
#         to start. For a loopback-only container pass your own flags (e.g. compose.yaml).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streamer ./streamer
COPY models ./models
COPY exporters ./exporters
COPY sim ./sim
COPY atomstream ./atomstream
RUN python -m venv /opt/atomstream \
 && /opt/atomstream/bin/pip install ".[serve]"

FROM python:${PYTHON_VERSION}-slim
ENV PATH=/opt/atomstream/bin:$PATH \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/atomstream /opt/atomstream
COPY deploy/serve-curve.yaml /etc/atomstream/serve.yaml
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin atom \
 && mkdir /artifact /artifacts /keys && chown atom /artifact /artifacts
USER 10001
WORKDIR /home/atom
VOLUME ["/artifact", "/keys"]
# ingest (PULL), publish (PUB), control (REP), metrics (HTTP)
EXPOSE 5555 5556 5557 9108
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2)"]
# Reachable from outside the container only with CURVE (the config above); publish only the ports you mean to expose.
ENTRYPOINT ["atomstream", "serve"]
CMD ["--config", "/etc/atomstream/serve.yaml"]
