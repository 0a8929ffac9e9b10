"""uvicorn's access log without query strings: a client may put a key (?api_key=...) or text there."""

from __future__ import annotations

import logging


class QueryStringFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            # uvicorn's args: (client, method, path?query, http_version, status)
            record.args = (args[0], args[1], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True


def redact_access_log() -> None:
    """Call after uvicorn has configured logging (uvicorn.Config does it)."""
    logging.getLogger("uvicorn.access").addFilter(QueryStringFilter())
