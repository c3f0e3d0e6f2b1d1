"""The web page for people, under ``/ui``: a playground, the labelers' K-way ranking page and the
rollout dashboard. Static files from ``serving/http/ui/`` (no build step, nothing from a CDN:
the Content-Security-Policy forbids any other origin), plus two read-only JSON views the pages
need beyond the public API: the logged prompt pool and the dashboard's numbers."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from heed.eventlog import KNOWN_FLAGS, FeedbackSummary
from heed.stats import wilson_interval
from heed.trainer_files import TrainerFiles, TrainerState
from serving.errors import InvalidRequest, ServiceError
from serving.service import Service

ASSETS = Path(__file__).parent / "ui"
PAGES = {"": "playground.html", "label": "label.html", "dashboard": "dashboard.html"}
HEADERS = {
    # Every script, style, image and request stays on this server: the page works with no network.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ROUNDS_SHOWN = 10


def feedback_json(summary: FeedbackSummary) -> dict[str, Any]:
    interval = wilson_interval(summary.thumbs_up, summary.thumbs)
    return {
        "events": summary.events,
        "thumbs_up": summary.thumbs_up,
        "thumbs_down": summary.thumbs_down,
        "thumbs_up_rate": summary.thumbs_up / summary.thumbs if summary.thumbs else None,
        "thumbs_up_interval": list(interval) if interval else None,
        "ratings": summary.ratings,
        "rating_mean": summary.rating_mean,
        "rankings": summary.rankings,
        "corrections": summary.corrections,
    }


class WebUi:
    def __init__(self, service: Service) -> None:
        self.service = service

    def _caller(self, request: Request) -> tuple[str, bool]:
        """(principal, is_admin): an admin key sees every caller's prompts, an API key its own."""
        authorization = request.headers.get("authorization")
        service = self.service
        if not service.admin_keys.open:
            try:
                return service.admin_keys.principal_for(authorization), True
            except ServiceError:
                pass
        return service.keys.principal_for(authorization), service.keys.open

    @staticmethod
    def page(name: str) -> Any:
        async def serve(request: Request) -> Response:
            return FileResponse(ASSETS / name, media_type="text/html; charset=utf-8", headers=HEADERS)

        return serve

    async def meta(self, request: Request) -> Response:
        """What the pages need to know before the caller gives a key (nothing secret)."""
        config = self.service.config
        return JSONResponse(
            {
                "object": "ui_meta",
                "model": config.served_model_name,
                "max_n": config.max_n,
                "flags": list(KNOWN_FLAGS),
                "ranking_ties": True,  # a ranking may tie answers: [2, [0, 3], 1]
                "api_key_required": not self.service.keys.open,
            }
        )

    async def prompts(self, request: Request) -> Response:
        principal, is_admin = self._caller(request)
        try:
            limit = int(request.query_params.get("limit", "50"))
        except ValueError:
            raise InvalidRequest("limit must be an integer", param="limit") from None
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be between 1 and 1000", param="limit")
        store = self.service.store
        logged = await asyncio.to_thread(store.prompts, None if is_admin else principal, limit)
        data = [
            {"prompt": p.prompt, "messages": list(p.messages) if p.messages else None, "times": p.times} for p in logged
        ]
        return JSONResponse({"object": "list", "scope": "all" if is_admin else "own", "data": data})

    async def dashboard(self, request: Request) -> Response:
        _, is_admin = self._caller(request)
        board = await asyncio.to_thread(self._dashboard)
        if not is_admin:  # what /admin/rollout keeps for admin keys stays there: evidence, decisions, rounds
            board["rollout"] |= {"evidence": {}, "history": []}
            board["trainer"]["rounds"] = []
            for version in board["versions"]:
                version["evaluation"] = {}
            board["scope"] = "api_key"
        else:
            board["scope"] = "admin"
        return JSONResponse(board)

    def _dashboard(self) -> dict[str, Any]:
        status = self.service.rollout.status()
        stable, canary, share = status.state.stable, status.state.canary, status.state.canary_share
        summaries = self.service.store.feedback_summary(0)
        manifests = {m.version: m for m in self.service.registry.versions()}
        served = {slot.policy_version for slot in status.slots}
        order = {name: manifest.sequence for name, manifest in manifests.items()}
        names = sorted(set(manifests) | set(summaries) | served, key=lambda v: (order.get(v, math.inf), v))
        versions = []
        for name in names:
            manifest = manifests.get(name)
            role = "stable" if name == stable else "canary" if name == canary else None
            traffic = (100.0 - share if canary else 100.0) if role == "stable" else share if role == "canary" else 0.0
            versions.append(
                {
                    "version": name,
                    "role": role,
                    "traffic_percent": traffic,
                    "parent": manifest.parent if manifest else None,
                    "source": manifest.source if manifest else None,
                    "created": manifest.created if manifest else None,
                    "evaluation": manifest.evaluation if manifest else {},
                    "feedback": feedback_json(summaries.get(name, FeedbackSummary())),
                }
            )
        files = TrainerFiles.of(self.service.config.data_dir)
        state = TrainerState.load(files.state)
        rounds = []
        for report in files.reports(last=ROUNDS_SHOWN):
            stages = report.get("stages", {})
            ppo = stages.get("ppo", {})
            keys = ("round", "started", "finished", "decision", "version", "data", "gate")
            rounds.append(
                {key: report.get(key) for key in keys}
                | {"ppo": {key: ppo.get(key) for key in ("first", "last", "kl", "seconds")}}
                | {"heldout": stages.get("reward_model", {}).get("heldout")}  # the reward model's, per kind
            )
        return {
            "object": "dashboard",
            "generated": time.time(),
            "rollout": status.to_json(),
            "versions": versions,
            "trainer": {
                "rounds_completed": state.round,
                "watermark": state.watermark,
                "round_in_progress": state.pending_watermark is not None,
                "rounds": rounds,
            },
        }


def ui_routes(service: Service) -> list[BaseRoute]:
    ui = WebUi(service)
    return [
        Route("/ui", lambda request: RedirectResponse("/ui/", status_code=308), methods=["GET"]),
        *(Route(f"/ui/{path}", ui.page(name), methods=["GET"]) for path, name in PAGES.items()),
        Route("/ui/api/meta", ui.meta, methods=["GET"]),
        Route("/ui/api/prompts", ui.prompts, methods=["GET"]),
        Route("/ui/api/dashboard", ui.dashboard, methods=["GET"]),
        Mount("/ui/static", app=StaticFiles(directory=ASSETS), name="ui-static"),
    ]
