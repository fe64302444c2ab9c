# One image for every stage: `chargify-stream gateway|processor|sink|migrate`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY chargify_stream chargify_stream
COPY ingest ingest
COPY processors processors
COPY schemas schemas
COPY sink sink
RUN pip install --no-cache-dir .
ENV GATEWAY_HOST=0.0.0.0
USER nobody
ENTRYPOINT ["chargify-stream"]
