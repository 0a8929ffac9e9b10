"""Models and their loading: GGUF and mlx-lm targets, tokenizers, the DFlash draft, the target's
hidden-state taps and cache rollback, and the load-time surgery (packed projections, fp32 transposes)."""
