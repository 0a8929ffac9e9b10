"""Serving one model: configuration, the loaded serving model, requests, the MLX-thread scheduler
and the asyncio bridge the HTTP server talks to."""
