"""What makes MLX ops fast on each backend: the BLAS the CPU preloads, the CPU's polynomial exp,
the CUDA/Metal kernels for verify-width blocks and the explicit compositions they must beat."""
