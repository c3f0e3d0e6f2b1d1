"""The GPU smoke check (`make gpu-smoke`), for anyone with a CUDA GPU; skipped without one.

The bundled model served on CUDA with a warm canary slot and the co-located trainer; thumbs from
a few callers start one round, trained on CUDA (`--device cuda`) with vLLM rollouts whose weights
arrive by vLLM's CUDA IPC transfer (`--weight-transfer ipc`); the server swaps the published
version into the canary slot; the canary's greedy log-probs must equal a fresh vLLM engine's on
the published weights. Written without a GPU to run it on (docs/deploy.md): the first run on
one is its first test."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from heed.gpu import gpu_count
from heed.models import resolve_model
from heed.registry import PolicyRegistry
from heed.rollout import PIN_HEADER
from tests.conftest import start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(gpu_count() == 0, reason="the GPU smoke check needs a CUDA GPU (make gpu-smoke)"),
    pytest.mark.timeout(3600),
]

KEYS = {"app": "sk-smoke-app"}
ADMIN = {"ops": "sk-smoke-admin"}
PROMPTS = ["Name a colour.", "Say something about the sea.", "What is two plus two?", "Write one short line."]
TRAINER_ENV = {
    "HEED_TRAINER_DEVICE": "cuda",
    "HEED_TRAINER_ROLLOUT": "vllm",
    "HEED_TRAINER_WEIGHT_TRANSFER": "ipc",  # a fallback to the file is logged: the test reads the log
    "HEED_TRAINER_POLL_S": "1",
    "HEED_TRAINER_MIN_NEW_FEEDBACK": "48",
    "HEED_TRAINER_PPO_ITERATIONS": "3",
    "HEED_TRAINER_PPO_EPISODES": "8",
    "HEED_TRAINER_MAX_NEW_TOKENS": "16",
    "HEED_TRAINER_EVAL_PROMPTS": "8",
    # the smoke check is about the GPU path, not about the gate: every candidate is published
    "HEED_TRAINER_MIN_WIN_RATE": "0",
    "HEED_TRAINER_RM_ACCURACY_MARGIN": "1",
    "HEED_TRAINER_MIN_THUMBS_AUC": "0",
    "HEED_TRAINER_MAX_THUMBS_ECE": "1",
    "HEED_TRAINER_MIN_RATINGS_SPEARMAN": "-1",
    "HEED_TRAINER_MAX_KL": "1e9",
    "HEED_TRAINER_TAKE_UP_WAIT_S": "0",
}


def post(server, path: str, body: dict, pin: str | None = None) -> dict:
    headers = {**server.headers(), **({PIN_HEADER: pin} if pin else {})}
    response = httpx.post(server.http_url + path, json=body, headers=headers, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def rollout(server) -> dict:
    headers = {"Authorization": f"Bearer {ADMIN['ops']}"}
    response = httpx.get(server.http_url + "/admin/rollout", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_round_trained_on_cuda_reaches_the_canary_with_a_fresh_engines_log_probs(tmp_path: Path) -> None:
    from vllm import LLM, SamplingParams

    server = start_server(
        resolve_model("default"), tmp_path / "data", tmp_path / "server.log", KEYS,
        "--with-trainer", "--canary-slot", "warm", "--registry-poll-s", "1",
        admin_keys=ADMIN, env=TRAINER_ENV, timeout=1200,
    )  # fmt: skip
    try:
        rng = random.Random(0)
        deadline = time.monotonic() + 1800
        while rollout(server)["canary"] is None:  # answers and thumbs until a round publishes
            assert time.monotonic() < deadline, server.log_text()[-4000:]
            assert server.process.poll() is None, server.log_text()[-4000:]
            user = f"user-{rng.randrange(20)}"
            answer = post(
                server,
                "/v1/completions",
                {"model": "heed", "prompt": rng.choice(PROMPTS), "max_tokens": 16, "user": user},
            )
            thumb = 1 if len(answer["choices"][0]["text"]) < 40 else -1  # short answers are liked
            post(server, "/v1/feedback", {"completion_id": answer["id"], "thumb": thumb})
        version = rollout(server)["canary"]
        deadline = time.monotonic() + 300
        while any(slot["swapping"] for slot in rollout(server)["slots"].values()):
            assert time.monotonic() < deadline, "the canary slot did not finish its swap"
            time.sleep(1)
        served = [
            post(
                server,
                "/v1/completions",
                {"model": "heed", "prompt": p, "max_tokens": 8, "temperature": 0, "logprobs": 5},
                pin=version,
            )
            for p in PROMPTS
        ]
        log = server.log_text()
    finally:
        server.stop()
    assert "IPC weight transfer failed" not in log

    folder = PolicyRegistry(tmp_path / "data" / "registry").verify(version)
    fresh = LLM(model=str(folder), enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    for answer, output in zip(served, fresh.generate(PROMPTS, params, use_tqdm=False), strict=True):
        choice, ours = answer["choices"][0]["logprobs"], output.outputs[0]
        assert choice["tokens"] == [fresh.get_tokenizer().decode([t]) for t in ours.token_ids]
        for top, theirs in zip(choice["top_logprobs"], ours.logprobs, strict=True):
            fresh_top = {lp.decoded_token: lp.logprob for lp in theirs.values()}
            for token, value in top.items():
                assert abs(value - fresh_top[token]) < 2e-2, (token, value, fresh_top[token])  # bf16 on a GPU
