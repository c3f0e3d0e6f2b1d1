"""Open mode (no API keys) is for one machine: heed refuses to listen elsewhere unless told to,
other web pages cannot reach it through the operator's browser (Host, Origin, Content-Type), and
the admin API stays off without an admin key."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.auth import ApiKeys, admin_principal, host_of, is_loopback
from serving.errors import PermissionDenied
from serving.http.api import OpenModeGuard
from tests.conftest import run_heed


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


def client(allow_any_host: bool = False) -> TestClient:
    app = Starlette(routes=[Route("/v1/completions", echo, methods=["GET", "POST"])])
    return TestClient(OpenModeGuard(app, allow_any_host), base_url="http://127.0.0.1:8000")


@pytest.mark.parametrize(
    ("headers", "method", "status", "code"),
    [
        ({}, "POST", 200, None),
        ({"Host": "localhost:8000", "Origin": "http://localhost:8000"}, "POST", 200, None),
        ({"Host": "[::1]:8000"}, "GET", 200, None),
        ({"Host": "evil.example:8000"}, "GET", 403, "host_not_allowed"),  # DNS rebinding
        ({"Origin": "http://evil.example"}, "POST", 403, "origin_not_allowed"),  # a page the operator visits
        ({"Origin": "null"}, "POST", 403, "origin_not_allowed"),
        ({"Content-Type": "text/plain"}, "POST", 415, "unsupported_media_type"),  # no CORS preflight needed
        ({"Content-Type": "application/x-www-form-urlencoded"}, "POST", 415, "unsupported_media_type"),
    ],
    ids=["json", "same-origin", "ipv6-loopback", "rebound-host", "cross-origin", "null-origin", "text", "form"],
)
def test_an_open_server_answers_only_its_own_machine_and_json(headers, method, status, code) -> None:
    if method == "POST":
        sent = {"Content-Type": "application/json", **headers}
        response = client().request(method, "/v1/completions", content=b'{"prompt": "x"}', headers=sent)
    else:
        response = client().request(method, "/v1/completions", headers=headers)
    assert response.status_code == status, response.text
    if code is not None:
        assert response.json()["error"]["code"] == code


def test_allow_open_lets_other_hosts_in_but_still_not_other_origins() -> None:
    anyone = client(allow_any_host=True)
    assert anyone.get("/v1/completions", headers={"Host": "heed.internal:8000"}).status_code == 200
    other = anyone.get("/v1/completions", headers={"Host": "heed.internal:8000", "Origin": "https://evil.example"})
    assert other.status_code == 403


def test_host_parsing() -> None:
    assert [host_of(v) for v in ("127.0.0.1:8000", "[::1]:80", "http://localhost:3000", "example.com")] == [
        "127.0.0.1",
        "[::1]",
        "localhost",
        "example.com",
    ]
    assert all(is_loopback(h) for h in ("localhost", "127.0.0.5", "[::1]", "app.localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "example.com", ""))


def test_without_an_admin_key_the_admin_api_is_off_even_when_the_service_is_open() -> None:
    with pytest.raises(PermissionDenied) as off:
        admin_principal(ApiKeys({}), ApiKeys({}), None)
    assert off.value.code == "admin_disabled"
    assert admin_principal(ApiKeys({"sk-ops": "ops"}), ApiKeys({}), "Bearer sk-ops") == "ops"


def test_serve_without_keys_refuses_a_non_loopback_host_in_one_line(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_heed(tmp_path / "cache", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loopback only" in lines[0] and "--allow-open" in lines[0], lines
    assert time.monotonic() - started < 30
