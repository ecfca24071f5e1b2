# mailguard gate image: multi-stage, runs as an unprivileged user, embedded Redis by default.
#   docker build -t mailguard .
#   docker run -v /etc/mailguard:/etc/mailguard:ro -p 10025:10025 mailguard
# The mounted config must listen on "0.0.0.0:10025" (or "[::]:10025") to be reachable.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libmilter-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mailguard ./mailguard
RUN python -m venv /opt/mailguard && /opt/mailguard/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends redis-server libmilter1.0.1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home-dir /var/lib/mailguard --create-home --shell /usr/sbin/nologin mailguard
COPY --from=build /opt/mailguard /opt/mailguard
COPY config/mailguard.toml /etc/mailguard/mailguard.toml
ENV PATH=/opt/mailguard/bin:$PATH MAILGUARD_STATE_DIR=/var/lib/mailguard
USER mailguard
VOLUME ["/var/lib/mailguard"]
EXPOSE 10025
# Healthy when the gate greets with 220 on its first listen address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import smtplib; smtplib.SMTP('127.0.0.1', 10025, timeout=4).quit()"
STOPSIGNAL SIGTERM
ENTRYPOINT ["mailguard"]
CMD ["serve", "--config", "/etc/mailguard/mailguard.toml"]
