# One image for every stage: `chargify-stream gateway|processor|sink|migrate`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY chargify_stream chargify_stream
COPY ingest ingest
COPY processors processors
COPY schemas schemas
COPY sink sink
# gcc builds the processor's field scan in C (processors/_formscan.c), then goes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV GATEWAY_HOST=0.0.0.0
USER nobody
ENTRYPOINT ["chargify-stream"]
