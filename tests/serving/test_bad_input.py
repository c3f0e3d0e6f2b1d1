"""Every caller mistake gets a 4xx with OpenAI's error shape, and the server keeps serving."""

from __future__ import annotations

import pytest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
FEEDBACK = "/v1/feedback"
OK = {"model": "heed", "prompt": "hi", "max_tokens": 2}
CHAT_OK = {"model": "heed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (name, method, path, body or raw bytes, headers, expected status, expected param or None)
CASES = [
    ("malformed-json", "POST", COMPLETIONS, b'{"model": "heed",', {}, 400, None),
    ("invalid-utf8", "POST", COMPLETIONS, b'{"model": "heed", "prompt": "\xff\xfe"}', {}, 400, None),
    ("empty-body", "POST", COMPLETIONS, b"", {}, 400, None),
    ("not-an-object", "POST", COMPLETIONS, b"[1, 2]", {}, 400, None),
    # Python's json takes NaN, Infinity and 1e999 (inf); no log or database takes them back
    ("nan-in-body", "POST", COMPLETIONS, b'{"model": "heed", "prompt": "x", "temperature": NaN}', {}, 400, None),
    ("number-beyond-a-double", "POST", CHAT, b'{"model": "heed", "messages": [], "top_p": 1e999}', {}, 400, None),
    (
        "tool-arguments-not-json",
        "POST",
        CHAT,
        {
            **CHAT_OK,
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                },
            ],
        },
        {},
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "tool-message-without-call-id",
        "POST",
        CHAT,
        {**CHAT_OK, "messages": [{"role": "tool", "content": "12"}]},
        {},
        400,
        "messages[0].tool_call_id",
    ),
    ("missing-prompt", "POST", COMPLETIONS, {"model": "heed"}, {}, 400, "prompt"),
    ("missing-model", "POST", COMPLETIONS, {"prompt": "x"}, {}, 400, "model"),
    ("wrong-type-temperature", "POST", COMPLETIONS, {**OK, "temperature": "hot"}, {}, 400, "temperature"),
    ("string-number-n", "POST", COMPLETIONS, {**OK, "n": "2"}, {}, 400, "n"),
    ("temperature-too-high", "POST", COMPLETIONS, {**OK, "temperature": 2.5}, {}, 400, "temperature"),
    ("top-p-zero", "POST", COMPLETIONS, {**OK, "top_p": 0}, {}, 400, "top_p"),
    ("n-zero", "POST", COMPLETIONS, {**OK, "n": 0}, {}, 400, "n"),
    ("n-too-large", "POST", COMPLETIONS, {**OK, "n": 1000}, {}, 400, "n"),
    ("n-greedy", "POST", COMPLETIONS, {**OK, "n": 2, "temperature": 0}, {}, 400, "n"),
    ("max-tokens-zero", "POST", COMPLETIONS, {**OK, "max_tokens": 0}, {}, 400, "max_tokens"),
    ("max-tokens-past-context", "POST", COMPLETIONS, {**OK, "max_tokens": 100000}, {}, 400, "max_tokens"),
    ("prompt-past-context", "POST", COMPLETIONS, {**OK, "prompt": "word " * 3000}, {}, 400, "prompt"),
    ("logprobs-too-many", "POST", COMPLETIONS, {**OK, "logprobs": 50}, {}, 400, "logprobs"),
    ("too-many-stops", "POST", COMPLETIONS, {**OK, "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    ("unknown-parameter", "POST", COMPLETIONS, {**OK, "best_of_all": 3}, {}, 400, "best_of_all"),
    ("token-id-out-of-vocab", "POST", COMPLETIONS, {**OK, "prompt": [1, 10**9]}, {}, 400, "prompt"),
    ("unknown-model", "POST", COMPLETIONS, {**OK, "model": "nope"}, {}, 404, "model"),
    ("top-k-a-string", "POST", COMPLETIONS, {**OK, "top_k": "5"}, {}, 400, "top_k"),
    ("repetition-penalty-zero", "POST", COMPLETIONS, {**OK, "repetition_penalty": 0}, {}, 400, "repetition_penalty"),
    ("min-tokens-above-max", "POST", COMPLETIONS, {**OK, "min_tokens": 5}, {}, 400, "min_tokens"),
    ("logit-bias-key-not-an-id", "POST", COMPLETIONS, {**OK, "logit_bias": {"hello": 1}}, {}, 400, "logit_bias"),
    ("logit-bias-past-vocab", "POST", COMPLETIONS, {**OK, "logit_bias": {"999999999": 1}}, {}, 400, "logit_bias"),
    ("stop-token-past-vocab", "POST", CHAT, {**CHAT_OK, "stop_token_ids": [10**9]}, {}, 400, "stop_token_ids"),
    ("prompt-logprobs-too-many", "POST", COMPLETIONS, {**OK, "prompt_logprobs": 21}, {}, 400, "prompt_logprobs"),
    (
        "prompt-logprobs-streamed",
        "POST",
        COMPLETIONS,
        {**OK, "prompt_logprobs": 1, "stream": True},
        {},
        400,
        "prompt_logprobs",
    ),
    # Inputs the engine's request encoder or the tokenizer would fail on: refused first, as the
    # caller's error (a 500 would count against the version that answered: a forced rollback).
    ("seed-past-int64", "POST", COMPLETIONS, {**OK, "seed": 2**64}, {}, 400, "seed"),
    ("seed-below-int64", "POST", COMPLETIONS, {**OK, "seed": -(2**63) - 1}, {}, 400, "seed"),
    (
        "lone-surrogate-stop",
        "POST",
        COMPLETIONS,
        b'{"model": "heed", "prompt": "hi", "stop": ["\\ud800"]}',
        {},
        400,
        None,
    ),
    ("lone-surrogate-prompt", "POST", COMPLETIONS, b'{"model": "heed", "prompt": "a\\udfffb"}', {}, 400, None),
    (
        "lone-surrogate-chat",
        "POST",
        CHAT,
        b'{"model": "heed", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        {},
        400,
        None,
    ),
    # A NUL in what the log keeps as a column (PostgreSQL's text cannot hold one): refused on
    # every backend alike, before the log (a failed write would mark the log unwritable).
    ("nul-in-user", "POST", COMPLETIONS, {**OK, "user": "a\x00b"}, {}, 400, "user"),
    (
        "nul-in-idempotency-key",
        "POST",
        FEEDBACK,
        {"completion_id": "cmpl-nope", "thumb": 1, "idempotency_key": "k\x00"},
        {},
        400,
        "idempotency_key",
    ),
    ("deeply-nested-json", "POST", COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, None),
    (
        "lone-surrogate-correction",
        "POST",
        FEEDBACK,
        b'{"completion_id": "cmpl-nope", "correction": "\\udc00"}',
        {},
        400,
        None,
    ),
    ("chat-no-messages", "POST", CHAT, {**CHAT_OK, "messages": []}, {}, 400, "messages"),
    (
        "chat-bad-role",
        "POST",
        CHAT,
        {**CHAT_OK, "messages": [{"role": "wizard", "content": "x"}]},
        {},
        400,
        "messages[0].role",
    ),
    ("chat-content-wrong-type", "POST", CHAT, {**CHAT_OK, "messages": [{"role": "user", "content": 5}]}, {}, 400, None),
    ("oversized-body", "POST", COMPLETIONS, {**OK, "prompt": "x" * (2 << 20)}, {}, 413, None),
    ("no-api-key", "POST", COMPLETIONS, OK, {"Authorization": ""}, 401, None),
    # Only the principals named by --pin-principals (alice here) may pick the version that answers.
    (
        "pin-by-model-not-allowed",
        "POST",
        COMPLETIONS,
        {**OK, "model": "tiny-v1"},
        {"Authorization": "Bearer sk-test-bob"},
        403,
        "model",
    ),
    (
        "pin-by-header-not-allowed",
        "POST",
        COMPLETIONS,
        OK,
        {"Authorization": "Bearer sk-test-bob", "X-Heed-Policy-Version": "tiny-v1"},
        403,
        None,
    ),
    ("wrong-api-key", "POST", COMPLETIONS, OK, {"Authorization": "Bearer sk-nope"}, 401, None),
    (
        "feedback-unknown-completion",
        "POST",
        FEEDBACK,
        {"completion_id": "cmpl-nope", "thumb": 1},
        {},
        404,
        "completion_id",
    ),
    ("feedback-no-signal", "POST", FEEDBACK, {"completion_id": "cmpl-nope"}, {}, 400, None),
    ("feedback-two-signals", "POST", FEEDBACK, {"completion_id": "x", "thumb": 1, "rating": 3}, {}, 400, None),
    ("feedback-bool-thumb", "POST", FEEDBACK, {"completion_id": "x", "thumb": True}, {}, 400, "thumb"),
    ("unknown-completion-lookup", "GET", "/v1/completions/cmpl-nope", None, {}, 404, "completion_id"),
    ("unknown-route", "GET", "/v1/nothing-here", None, {}, 404, None),
    ("wrong-method", "GET", FEEDBACK, None, {}, 405, None),
]

# Feedback whose range checks need a real completion: (name, signal, expected param).
FEEDBACK_CASES = [
    ("thumb-zero", {"thumb": 0}, "thumb"),
    ("rating-eight", {"rating": 8}, "rating"),
    ("rating-zero", {"rating": 0}, "rating"),
    ("ranking-duplicate", {"ranking": [0, 0]}, "ranking"),
    ("ranking-out-of-range", {"ranking": [0, 5]}, "ranking"),
    ("ranking-all-tied", {"ranking": [[0, 1]]}, "ranking"),
    ("ranking-tie-repeats", {"ranking": [[0, 0], 1]}, "ranking"),
    ("choice-index-out-of-range", {"thumb": 1, "choice_index": 7}, "choice_index"),
    ("empty-correction", {"correction": "  "}, "correction"),
    ("bad-flag", {"thumb": 1, "flags": ["Not A Flag!"]}, "flags"),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "headers", "status", "param"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request_gets_a_clear_openai_shaped_error(http, name, method, path, body, headers, status, param):
    if isinstance(body, bytes):
        response = http.request(method, path, content=body, headers=headers)
    else:
        response = http.request(method, path, json=body, headers=headers)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param


@pytest.mark.parametrize(("name", "signal", "param"), FEEDBACK_CASES, ids=[c[0] for c in FEEDBACK_CASES])
def test_out_of_range_feedback_is_refused(http, name, signal, param):
    completion_id = http.post(COMPLETIONS, json={**OK, "n": 2}).json()["id"]

    response = http.post(FEEDBACK, json={"completion_id": completion_id, **signal})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_the_server_still_serves_after_every_bad_request(http, server):
    for _, method, path, body, headers, _, _ in CASES:
        if isinstance(body, bytes):
            http.request(method, path, content=body, headers=headers)
        else:
            http.request(method, path, json=body, headers=headers)

    assert http.get("/health").status_code == 200
    assert http.post(COMPLETIONS, json=OK).status_code == 200
    assert server.process.poll() is None
    assert "Traceback" not in server.log_text()
