# Tollgate: a slim, non-root image. Mount your policies at /etc/tollgate and a
# volume for the SQLite ledger at /var/lib/tollgate (or use a PostgreSQL ledger).
#
# BASE is any image with Python 3.11+ and its venv module (the official one by
# default; `--build-arg BASE=...` for a mirror or an in-house Debian). Tollgate goes
# into its own virtualenv, so a distribution's Python packages are left alone.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /tmp/tollgate-src/
COPY proxy /tmp/tollgate-src/proxy
RUN python3 -m venv /opt/tollgate \
    && /opt/tollgate/bin/pip install --quiet /tmp/tollgate-src \
    && rm -rf /tmp/tollgate-src \
    && groupadd --system --gid 10001 tollgate \
    && useradd --system --uid 10001 --gid tollgate --home-dir /var/lib/tollgate tollgate \
    && mkdir -p /var/lib/tollgate /etc/tollgate && chown tollgate:tollgate /var/lib/tollgate
COPY docker/healthcheck.py /opt/tollgate/healthcheck.py
COPY policies /etc/tollgate

USER tollgate
WORKDIR /var/lib/tollgate
ENV PATH=/opt/tollgate/bin:$PATH TOLLGATE_CONFIG=/etc/tollgate
# A new named volume mounted here takes this directory's owner: the ledger is writable.
EXPOSE 8080
# Follows the server's own --host/--port, so `serve --port 9000` stays healthy too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/opt/tollgate/bin/python", "/opt/tollgate/healthcheck.py"]
ENTRYPOINT ["/opt/tollgate/bin/tollgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--ledger", "sqlite:////var/lib/tollgate/tollgate.db"]
