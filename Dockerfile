# Tollgate: a slim, non-root image. Mount your policies at /etc/tollgate and a
# volume for the SQLite ledger at /var/lib/tollgate (or use a PostgreSQL ledger).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && useradd --system --uid 10001 --home-dir /var/lib/tollgate tollgate \
    && mkdir -p /var/lib/tollgate /etc/tollgate && chown tollgate /var/lib/tollgate
COPY policies /etc/tollgate

USER tollgate
ENV TOLLGATE_CONFIG=/etc/tollgate
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
ENTRYPOINT ["tollgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--ledger", "sqlite:////var/lib/tollgate/tollgate.db"]
