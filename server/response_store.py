"""Stored Responses API responses, for `previous_response_id` and `GET /v1/responses/{id}`: in memory,
least recently used first out, so a long-running server's memory stays bounded."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

from server.responses_request import InputItem


class StoredResponse(NamedTuple):
    response: dict[str, Any]  # as it was sent
    conversation: list[InputItem]  # every earlier turn's items, this request's input and its output


class ResponseStore:
    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored

    def put(self, stored: StoredResponse) -> None:
        self._entries[stored.response["id"]] = stored
        self._entries.move_to_end(stored.response["id"])
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._entries.pop(response_id, None) is not None
