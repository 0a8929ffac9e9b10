"""The epoch of this process's kernel routes (which op a SwiGLU, a norm or a product runs as).

Compiled graphs (engine/model/compiled_layer.py) keep the routes their ops took while they were traced, so
whatever switches a route afterwards calls changed(), and graphs traced in an older epoch are traced again.
"""

from __future__ import annotations

_epoch = 0


def changed() -> None:
    global _epoch
    _epoch += 1


def current() -> int:
    return _epoch
