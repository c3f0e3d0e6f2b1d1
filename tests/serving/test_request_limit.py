"""Past --max-connections requests in flight, a caller gets a 503 at once with an OpenAI-shaped
body and Retry-After (uvicorn's own limit answered in plain text), health probes are always
answered, /metrics and admin calls from a budget of their own, and the limits free as requests end. The
middleware under test wraps a small app whose handlers hold requests open until told to end them."""

from __future__ import annotations

import asyncio

import httpx
import openai
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.http.api import RequestLimit


def limited_app(
    limit: int, registry: CollectorRegistry, own: int = 64
) -> tuple[RequestLimit, asyncio.Event, list[str]]:
    release, entered = asyncio.Event(), []

    async def held(request: Request) -> JSONResponse:
        entered.append(request.url.path)
        await release.wait()
        return JSONResponse({"object": "text_completion", "choices": []})

    async def probe(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/v1/completions", held, methods=["POST"]),
        Route("/admin/rollout/{action}", held, methods=["POST"]),
    ]
    routes += [Route(path, probe) for path in ("/health", "/ready", "/metrics")]
    rejected = Counter("heed_requests_rejected", "refused requests", ["reason"], registry=registry)
    return RequestLimit(Starlette(routes=routes), limit, rejected, own), release, entered


async def _entered(entered: list[str], count: int) -> None:
    while len(entered) < count:
        await asyncio.sleep(0.01)


async def _limit_scenario() -> None:
    registry = CollectorRegistry()
    app, release, entered = limited_app(2, registry, own=1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://heed") as http:
        held = [asyncio.create_task(http.post("/v1/completions", json={"prompt": "x"})) for _ in range(2)]
        await asyncio.wait_for(_entered(entered, 2), 5)

        # A third request is refused at once, in the OpenAI error shape, and says when to retry.
        refused = await asyncio.wait_for(http.post("/v1/completions", json={"prompt": "x"}), 5)
        assert refused.status_code == 503 and refused.headers["retry-after"] in {"1", "2", "3"}
        error = refused.json()["error"]
        assert error["code"] == "overloaded" and error["type"] == "service_unavailable" and "retry" in error["message"]

        # The official client sees the same: a 503 carrying the code (retries off, so it is not hidden).
        client = openai.AsyncOpenAI(api_key="k", base_url="http://heed/v1", http_client=http, max_retries=0)
        try:
            await client.completions.create(model="heed", prompt="x")
            raise AssertionError("the client's request got through past the limit")
        except openai.InternalServerError as exc:
            assert exc.status_code == 503 and exc.code == "overloaded"

        # Probes and scrapes are answered while the limit is reached, and an admin call gets in.
        for path in ("/health", "/ready", "/metrics"):
            assert (await asyncio.wait_for(http.get(path), 5)).status_code == 200
        rollback = asyncio.create_task(http.post("/admin/rollout/rollback", json={}))
        await asyncio.wait_for(_entered(entered, 3), 5)
        assert app.in_flight == {"requests": 2, "own": 1}
        # Their budget has a limit of its own too (here 1): a flood of scrapes cannot grow without end;
        # the health probes are still answered.
        assert (await asyncio.wait_for(http.get("/metrics"), 5)).status_code == 503
        for path in ("/health", "/ready"):
            assert (await asyncio.wait_for(http.get(path), 5)).status_code == 200
        rejected = {
            r: registry.get_sample_value("heed_requests_rejected_total", {"reason": r}) for r in app.REASONS.values()
        }
        assert rejected == {"max_connections": 2, "metrics_and_admin": 1}

        # Once the held requests end, requests get through again.
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held, rollback)] == [200, 200, 200]
        assert app.in_flight == {"requests": 0, "own": 0}
        assert (await http.post("/v1/completions", json={"prompt": "x"})).status_code == 200


def test_requests_past_the_limit_get_an_openai_shaped_503_and_probes_are_always_answered() -> None:
    asyncio.run(_limit_scenario())


async def _failing_scenario() -> None:
    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("the handler failed")

    app = RequestLimit(Starlette(routes=[Route("/v1/completions", boom, methods=["POST"])]), 1)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://heed") as http:
        for _ in range(3):  # each failure frees its place: the third still reaches the handler
            assert (await http.post("/v1/completions", json={})).status_code == 500
    assert app.in_flight == {"requests": 0, "own": 0}


def test_a_request_that_fails_frees_its_place() -> None:
    asyncio.run(_failing_scenario())
