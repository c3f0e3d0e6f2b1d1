"""A property-based fuzz of the whole HTTP API, generated from the server's own /openapi.json by
schemathesis, against a real `heed serve` on a tiny model: valid and invalid requests to every
operation, with the API key (or the admin key on /admin), a bounded number of examples each.
No answer may be a 5xx, and every answer must match the document (status, content type, body).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import Case, Response
from schemathesis.specs.openapi.checks import positive_data_acceptance

from serving.http.openapi import openapi_document
from tests.conftest import ARTIFACTS, KEYS, RunningServer, start_server

pytestmark = pytest.mark.slow  # starts its own `heed serve`
ADMIN = {"ops": "sk-admin-fuzz"}
EXAMPLES = 30  # per operation (and schemathesis's coverage phase): 15 operations, about a minute


@pytest.fixture(scope="module")
def fuzz_server(tiny_model, tmp_path_factory) -> Iterator[RunningServer]:
    # Its own server: the fuzz logs a thousand records and steers the rollout, which the session
    # server's tests must not see. A short context: a schema-valid chat asks for every token left.
    running = start_server(
        tiny_model,
        tmp_path_factory.mktemp("fuzz-data"),
        ARTIFACTS / "server-fuzz.log",
        KEYS,
        "--max-model-len",
        "128",
        admin_keys=ADMIN,
    )
    yield running
    running.stop()
    assert running.process.returncode == 0, running.log_text()[-3000:]


# The document the server serves at /openapi.json (a test below checks they are the same), built
# at collection: schemathesis's lazy fixture loader does not run under pytest 9.
schema = schemathesis.openapi.from_dict(openapi_document())


def test_the_fuzzed_document_is_the_one_served(fuzz_server: RunningServer) -> None:
    served = httpx.get(f"{fuzz_server.http_url}/openapi.json", timeout=30)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(openapi_document()))


# What no JSON Schema states: this server's limits (context length, max n, the vocabulary's size
# for token ids and top_k), rules across fields (exactly one feedback signal, top_logprobs needs
# logprobs, min_tokens at most max_tokens, prompt or messages, the version to canary, a json_schema
# format's schema, a named score's key, value and data type together) and facts of the log (the
# choices a completion has). A schema-valid request may get a 400 naming these only.
VOCABULARY = {"logit_bias", "stop_token_ids", "top_k", "min_tokens", "response_format"}  # and the schemas it compiles
VOCABULARY |= {"prompt_logprobs", "tool_choice", "tools", "messages"}  # not with stream; the tools named; tool turns
FORMATS = {"response_format.json_schema", "response_format.json_schema.schema"}
BEYOND_THE_SCHEMA = {
    "POST /v1/completions": {"prompt", "max_tokens", "n", "stream", *VOCABULARY, *FORMATS},
    "POST /v1/chat/completions": {"messages", "max_tokens", "n", "top_logprobs", *VOCABULARY, *FORMATS},
    "POST /tokenize": {"prompt", "messages"},
    "POST /detokenize": {"tokens"},
    "POST /v1/feedback": {
        *("thumb", "rating", "ranking", "correction", "choice_index", "idempotency_key"),
        *("key", "score", "data_type"),
    },
    "POST /admin/rollout/{action}": {"version"},
}
ACCEPTED_OR_NOT_FOUND = {401, 403, 404, 409}  # who asks, and what exists, are not the schema's either


def schema_valid_data_is_accepted(ctx: object, response: Response, case: Case) -> None:
    """schemathesis's positive_data_acceptance, knowing the rules above."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    status = response.status_code
    if 200 <= status < 300 or status in ACCEPTED_OR_NOT_FOUND:
        return
    param = str((response.json().get("error") or {}).get("param") or "") if status == 400 else ""
    allowed = BEYOND_THE_SCHEMA.get(case.operation.label, set())
    assert param.split("[")[0] in allowed, f"a schema-valid request got {status}: {response.text[:500]}"


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure replays
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)
def test_no_server_error_and_every_answer_matches_the_document(case: Case, fuzz_server: RunningServer) -> None:
    admin = case.path.startswith("/admin")
    headers = fuzz_server.admin_headers() if admin else fuzz_server.headers("alice")
    case.call_and_validate(
        base_url=fuzz_server.http_url,
        headers=headers,
        timeout=60,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[schema_valid_data_is_accepted],
    )
