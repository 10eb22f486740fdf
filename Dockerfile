# syntax=docker/dockerfile:1
# The locator: a multi-stage, slim image running as a non-root user.
# Build: docker build -t locator .   Run: see README.md "Deploying at scale".

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/locator
# Dependencies first (cached while only the code changes): install from pyproject's metadata.
COPY pyproject.toml README.md ./
RUN mkdir -p locator ingest alembic/versions locator/api locator/web \
 && touch locator/__init__.py ingest/__init__.py locator/api/__init__.py locator/web/__init__.py \
          alembic/env.py \
 && /opt/locator/bin/pip install --upgrade pip \
 && /opt/locator/bin/pip install .
# Then the code itself (no editable install: migrations ship inside the package).
COPY locator ./locator
COPY ingest ./ingest
COPY alembic ./alembic
RUN /opt/locator/bin/pip install --no-deps --force-reinstall .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/locator --create-home locator
COPY --from=build /opt/locator /opt/locator
ENV PATH=/opt/locator/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LOCATOR_DATABASE_URL=sqlite:////var/lib/locator/locator.db \
    LOCATOR_ACCEPT_TEST_NHS_NUMBERS=false
USER locator
WORKDIR /var/lib/locator
EXPOSE 8080 2575 11112
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz').status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["locator"]
CMD ["serve"]
