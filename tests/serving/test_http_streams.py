"""A stream whose 200 headers are sent still ends in an OpenAI-shaped error event and [DONE] when
generation fails part way (the engine's failure or the service's), never in a cut connection."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serving.errors import Unavailable
from serving.http.api import HttpApi
from serving.requests import ChoiceDelta


async def failing(exc: Exception) -> AsyncIterator[Any]:
    yield [ChoiceDelta(0, "Hel", None, None)]
    raise exc


async def collect(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
@pytest.mark.parametrize(
    ("exc", "error_type"),
    [
        (RuntimeError("engine core died"), "server_error"),
        (Unavailable("the event log cannot be written", code="event_log_unavailable"), "service_unavailable"),
    ],
    ids=["engine", "event-log"],
)
def test_a_stream_that_fails_midway_ends_with_an_error_event_then_done(chat, exc, error_type) -> None:
    api = HttpApi(service=None)  # type: ignore[arg-type]  # the event generators use no service
    base = {"id": "cmpl-1", "created": 0, "model": "v1"}
    events = failing(exc)
    lines = asyncio.run(
        collect(api._chat_events(events, base, 1, False) if chat else api._completion_events(events, base, False))
    )
    assert lines[-1] == "data: [DONE]\n\n"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == error_type
    assert "Hel" in "".join(lines[:-2])  # what was generated before the failure was sent
    assert "engine core died" not in error["message"]  # an internal error's text stays in the log
