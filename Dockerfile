# One image for the API and the workers; the command picks the role (see docker-compose.yml).
FROM python:3.11-slim

# model exports (+onnx/+openvino backends) live on the data volume: made once, shared
# production: the API refuses to start without VITRINE_API_KEY and serves no /docs unless
# VITRINE_DOCS=true (it listens on 0.0.0.0 inside the container, so it must be closed by default)
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITRINE_DATA_DIR=/data VITRINE_ENVIRONMENT=production \
    VITRINE_EXPORT_DIR=/data/exports
WORKDIR /app

# CPU-only torch wheels: the CUDA ones are several GB and unused here. The product only:
# without the `eval` extra (matplotlib, OpenCV, Jinja2 for `vitrine evaluate`'s study and
# report); evaluation/ still ships for `vitrine bench`, which needs none of them.
COPY pyproject.toml README.md ./
COPY indexer ./indexer
COPY services ./services
COPY workers ./workers
COPY evaluation ./evaluation
COPY vitrine ./vitrine
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && useradd --create-home --uid 1000 vitrine \
    && mkdir -p /data && chown vitrine /data
USER vitrine
VOLUME ["/data"]
EXPOSE 8000
CMD ["vitrine", "serve", "--host", "0.0.0.0", "--port", "8000"]
