"""The OpenAPI 3.1 document of the HTTP API, built from the same pydantic models that parse it."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from serving.http.protocol import ChatBody, CompletionBody, DetokenizeBody, FeedbackBody, TokenizeBody

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_OBJECT = {"type": "object"}
# One server-sent event of a stream: a JSON chunk (or, for a failure after the headers, a JSON
# {"error": ...}), and "[DONE]" last.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json", "contentSchema": _OBJECT},
            ]
        }
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    described = {
        400: "invalid request",
        401: "missing or wrong API key",
        403: "not your completion (admin: no admin key configured)",
        404: "unknown model or completion",
        409: "idempotency key reused with another body (admin: no canary to act on, or one already)",
        413: "body too large",
        503: "engine still loading",
    }
    return {
        str(s): {
            "description": described[s],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def _json_body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _ok(description: str, media: str = "application/json", status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {media: {"schema": _OBJECT}}}}


@cache
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [
            (CompletionBody, "validation"),
            (ChatBody, "validation"),
            (FeedbackBody, "validation"),
            (TokenizeBody, "validation"),
            (DetokenizeBody, "validation"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    components = {**schemas.get("$defs", {}), "Error": _ERROR}
    generate_errors = _errors(400, 401, 404, 413, 503)
    sse = {"text/event-stream": {"schema": _SSE_EVENT}}
    security: list[dict[str, list[str]]] = [{"bearer": []}]
    admin: list[dict[str, list[str]]] = [{"admin": []}]
    paths = {
        "/v1/completions": {
            "post": {
                "summary": "Create a completion",
                "operationId": "createCompletion",
                "security": security,
                "requestBody": _json_body("CompletionBody"),
                "responses": {
                    "200": {
                        "description": "the completion (or a stream of chunks)",
                        "content": {"application/json": {"schema": _OBJECT}, **sse},
                    },
                    **generate_errors,
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "Create a chat completion",
                "operationId": "createChatCompletion",
                "security": security,
                "requestBody": _json_body("ChatBody"),
                "responses": {
                    "200": {
                        "description": "the chat completion (or a stream of chunks)",
                        "content": {"application/json": {"schema": _OBJECT}, **sse},
                    },
                    **generate_errors,
                },
            }
        },
        "/v1/completions/{completion_id}": {
            "get": {
                "summary": "A logged completion with its feedback (owner only)",
                "operationId": "getCompletion",
                "security": security,
                "parameters": [{"name": "completion_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {**_ok("the completion record"), **_errors(401, 403, 404)},
            }
        },
        "/v1/feedback": {
            "post": {
                "summary": "Give feedback on a completion",
                "operationId": "createFeedback",
                "security": security,
                "parameters": [
                    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}}
                ],
                "requestBody": _json_body("FeedbackBody"),
                "responses": {
                    **_ok("logged", status="201"),
                    **_ok("a replay of an earlier identical request"),
                    **_errors(400, 401, 403, 404, 409, 413),
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "Served models (policy versions)",
                "operationId": "listModels",
                "security": security,
                "responses": {**_ok("the list"), **_errors(401)},
            }
        },
        "/tokenize": {
            "post": {
                "summary": "The token ids a completion of this prompt (or chat) would start from (as vLLM)",
                "operationId": "tokenize",
                "security": security,
                "requestBody": _json_body("TokenizeBody"),
                "responses": {**_ok("count, max_model_len and tokens"), **_errors(400, 401, 404, 413, 503)},
            }
        },
        "/detokenize": {
            "post": {
                "summary": "The text of token ids (as vLLM)",
                "operationId": "detokenize",
                "security": security,
                "requestBody": _json_body("DetokenizeBody"),
                "responses": {**_ok("the text, as prompt"), **_errors(400, 401, 404, 413, 503)},
            }
        },
        "/version": {
            "get": {"summary": "vLLM's version (and heed's)", "operationId": "version", "responses": _ok("versions")}
        },
        "/admin/rollout": {
            "get": {
                "summary": "Rollout status: stable, canary and share, evidence, decision history (admin key)",
                "operationId": "getRollout",
                "security": admin,
                "responses": {**_ok("the rollout status"), **_errors(401, 403)},
            }
        },
        "/admin/rollout/{action}": {
            "post": {
                "summary": "Steer the rollout: canary (body {version}), promote, rollback, pause, resume (admin key)",
                "operationId": "steerRollout",
                "security": admin,
                "parameters": [
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["canary", "promote", "rollback", "pause", "resume"]},
                    }
                ],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": {"version": {"type": "string"}}}
                        }
                    },
                },
                "responses": {**_ok("the rollout status after the action"), **_errors(400, 401, 403, 404, 409)},
            }
        },
        "/admin/registry": {
            "get": {
                "summary": "Published policy versions with their manifests (admin key)",
                "operationId": "listPolicyVersions",
                "security": admin,
                "responses": {**_ok("the versions, oldest first"), **_errors(401, 403)},
            }
        },
        "/ui/api/meta": {
            "get": {
                "summary": "The web page's settings: served model name, max n, feedback flags, whether keys are on",
                "operationId": "uiMeta",
                "responses": _ok("the page settings"),
            }
        },
        "/ui/api/prompts": {
            "get": {
                "summary": "Distinct logged prompts, latest first: the caller's (API key) or everyone's (admin key)",
                "operationId": "listLoggedPrompts",
                "security": [*security, *admin],
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                    }
                ],
                "responses": {**_ok("the prompts"), **_errors(400, 401)},
            }
        },
        "/ui/api/dashboard": {
            "get": {
                "summary": "Rollout, per-version feedback with 95% intervals, decisions and the trainer's last rounds",
                "operationId": "getDashboard",
                "security": [*security, *admin],
                "responses": {**_ok("the dashboard's numbers"), **_errors(401)},
            }
        },
        "/health": {"get": {"summary": "Liveness", "operationId": "health", "responses": _ok("alive")}},
        "/ready": {
            "get": {
                "summary": "Readiness: the engine is loaded",
                "operationId": "ready",
                "responses": {**_ok("ready"), "503": {"description": "loading"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "operationId": "metrics",
                "responses": _ok("metrics", media="text/plain"),
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "heed", "version": "1", "description": "OpenAI-compatible completions with feedback."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
                "admin": {"type": "http", "scheme": "bearer", "description": "an admin key (not an API key)"},
            },
        },
    }
