# The rateguard demo as an image: compose.yaml runs three of these on one Redis.
#   docker build -t rateguard-demo . && docker run -p 127.0.0.1:3000:3000 rateguard-demo
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The library and its dependencies first: editing the demo doesn't reinstall them.
COPY pyproject.toml README.md LICENSE ./
COPY rateguard ./rateguard
RUN pip install ".[demo]"
COPY demo ./demo

USER nobody
EXPOSE 3000
# 0.0.0.0: reachable through the published port. Clients then connect from the Docker network,
# not from loopback, so the admin API answers only with RATEGUARD_ADMIN_TOKEN set.
CMD ["uvicorn", "demo.app:app", "--host", "0.0.0.0", "--port", "3000"]
