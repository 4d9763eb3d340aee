# wsiseg, CPU inference image: the wsiseg command and ONNX Runtime, no torch, no training extra.
#   docker build -t wsiseg:cpu .
#   docker run --rm -v "$PWD:/data" wsiseg:cpu segment slide.svs -o map.tif
# The default model (models/wsiseg-ebhi-unet.onnx) is baked in when it is in the build context;
# otherwise pass --model or set WSISEG_MODEL. The GPU image is Dockerfile.gpu.
ARG BASE=python:3.11-slim

# --- build: a virtual environment in /opt/wsiseg, copied whole into the runtime stage (the
# sources, pip's build files and the wheel cache stay behind).
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/wsiseg
COPY pyproject.toml README.md /src/
COPY wsiseg /src/wsiseg
COPY models /src/models
COPY training /src/training
RUN /opt/wsiseg/bin/pip install --no-cache-dir /src \
 && find /opt/wsiseg -name __pycache__ -prune -exec rm -rf {} +

# --- runtime
FROM ${BASE}
LABEL org.opencontainers.image.title="wsiseg" \
      org.opencontainers.image.description="Tissue-class segmentation of H&E whole-slide images (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/wsiseg /opt/wsiseg
ENV PATH=/opt/wsiseg/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# A real home for caches (ONNX Runtime writes one), so that none lands in the mounted /data.
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin wsiseg \
 && mkdir -p /data && chown wsiseg:wsiseg /data
# Smoke test at build: the command runs, OpenSlide's library loads, and torch is absent.
RUN wsiseg --version \
 && python3 -c "import openslide, onnxruntime; print('openslide', openslide.__library_version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())" \
 && python3 -c "import importlib.util as u, sys; sys.exit('torch must not be in the inference image' if u.find_spec('torch') else 0)"
USER wsiseg
WORKDIR /data
ENTRYPOINT ["wsiseg"]
CMD ["--help"]
