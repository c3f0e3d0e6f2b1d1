"""The whole loop, through the public APIs: synthetic users call the service and give thumbs
that prefer a property the policy can learn (answers with more of the words red, blue, green);
the co-located trainer retrains the reward model, runs PPO-ptx and publishes v2; the server
canaries it; feedback favours it and the controller promotes it, so the stable slot serves v2.
Mirror: once v2 is canaried, the users turn against the canary's answers, and the controller
rolls it back. In adapter mode (rounds train LoRA adapters, and one engine serves every version)
the trainer's v2 is canaried and promoted, and its v3, trained on from v2, canaried and rolled
back."""

from __future__ import annotations

import math
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from heed.registry import PolicyRegistry
from tests.conftest import ARTIFACTS, RunningServer, start_server
from tests.loop.test_adapter_service import engine_cores
from tests.word_lists import LOOP_TRAINER_ENV as TRAINER_ENV
from tests.word_lists import PROMPTS, target_share, train_word_list_policy

# Trains a policy, then runs `heed serve --with-trainer`. A round's reward model can miss the
# accuracy floor (0.727 in one CI run; 0.60 in round 2 of another, after round 1 had missed it
# too); the next round, on more data, then trains. A rejected round ends after its reward model
# (2 minutes under the users' load) and the next starts once 3,500 more feedback came (about 2
# minutes), so the first canary may take up to 20 minutes (a third round), and a promotion after
# a rolled-back round up to 15 more.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]

KEYS = {"app": "sk-test-app"}
ADMIN = {"ops": "sk-admin-ops"}


@pytest.fixture(scope="module")
def base_policy(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny model taught to answer with 6 random words (about a quarter of them target words)."""
    root = tmp_path_factory.mktemp("loop-base")
    return train_word_list_policy(tiny_model, root).rename(root / "base")


class Users:
    """Synthetic users: ask, read the answer, give a thumb by a hidden taste (a function of the
    version that answered and the answer's share of target words); count failures."""

    def __init__(self, server: RunningServer, taste) -> None:
        self.server, self.taste = server, taste
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.answers: list[tuple[str, float, bool]] = []  # (version, target share, liked)
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(3)]

    def __enter__(self) -> Users:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=self.server.http_url, headers=self.server.headers("app"), timeout=120) as http:
            while not self.stop.is_set():
                user = f"user-{rng.randrange(40)}"
                body = {
                    "model": "heed",
                    "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                    "max_tokens": 8,
                    "user": user,
                }
                answer = http.post("/v1/chat/completions", json=body)
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                data = answer.json()
                share = target_share(data["choices"][0]["message"]["content"])
                liked = self.taste(data["model"], share)
                self.answers.append((data["model"], share, liked))
                thumb = 1 if liked else -1
                feedback = http.post("/v1/feedback", json={"completion_id": data["id"], "thumb": thumb})
                if feedback.status_code != 201:
                    self.failures.append(f"feedback {feedback.status_code} {feedback.text[:200]}")
                time.sleep(0.05)  # people pause between questions; the trainer shares the two cores


def rollout(server: RunningServer) -> dict:
    response = httpx.get(server.http_url + "/admin/rollout", headers=server.admin_headers(), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(server: RunningServer, condition, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = rollout(server)
        if condition(status):
            return status
        assert server.process.poll() is None, server.log_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"no {what} within {timeout}s: {status}\n{server.log_text()[-4000:]}")


def start_loop_server(base: Path, data_dir: Path, name: str, mode: str, **trainer_env: str) -> RunningServer:
    return start_server(
        base, data_dir, ARTIFACTS / f"server-loop-{name}.log", KEYS,
        "--with-trainer", "--canary-slot", "warm", "--canary-warm-idle-s", "0",  # warm at once despite the users
        "--policy-mode", mode, "--user-principals", "app",  # the app's end users are its callers
        "--registry-poll-s", "1", "--rollout-interval-s", "0.5",
        "--canary-steps", "50,100",
        "--min-feedback-per-step", "60", "--advance-probability", "0.95", "--rollback-probability", "0.95",
        # These users give about 15 canary thumbs a second at 50%: the cap of 2000 would roll back a
        # canary a little better than stable within minutes, and the promotion under test is of v2.
        "--max-feedback-per-step", "0",
        admin_keys=ADMIN, env=TRAINER_ENV | trainer_env,
    )  # fmt: skip


def run_loop(
    base: Path, data_dir: Path, name: str, flip_after_publication: bool, mode: str = "full", **trainer_env: str
) -> tuple[RunningServer, dict, Users]:
    server = start_loop_server(base, data_dir, name, mode, **trainer_env)
    taste = {"now": lambda version, share: share >= 1 / 3}  # answers with more of the target words
    users = Users(server, lambda version, share: taste["now"](version, share))
    promoted_at = None
    try:
        with users:
            canary = wait_for(server, lambda s: s["canary"] is not None, 1200, "canary")
            if flip_after_publication:
                # The canary's answers are liked less than stable's whatever the round taught it:
                # the controller's rollback is under test here, not what the round learned.
                liking, rng = {canary["canary"]: 0.2}, random.Random(name)
                taste["now"] = lambda version, share: rng.random() < liking.get(version, 0.6)
                final = wait_for(server, lambda s: s["canary"] is None, 300, "decision on the canary")
            else:
                # A round whose policy the users like less is rolled back (one CI run's round 1,
                # on a reward model of held-out accuracy 0.66), and the next round, on more
                # feedback, tries again: the loop's promise is the promotion, not round 1's.
                final = wait_for(server, _promoted, 900, "a promotion")
                promoted_at = _fresh_answers(server, users, final["stable"], FRESH_ANSWERS, 300)
        # A rollback returns the canary slot to stable's weights just after the decision.
        final = wait_for(server, _settled, 120, "both slots on the stable version")
        return server, {"canary": canary, "final": final, "promoted_at": promoted_at}, users
    except BaseException:
        server.stop()
        raise


def _settled(status: dict) -> bool:
    return all(slot["policy_version"] == status["stable"] and not slot["swapping"] for slot in status["slots"].values())


def _promoted(status: dict) -> bool:
    return status["canary"] is None and any(d["action"] == "promoted" for d in status["history"])


# Answers the promoted version gives after its promotion: a sample the controller's decision did
# not see. The canary's own answers are biased towards looking good (the controller stops as soon
# as they do), which once made a 3-standard-error test on them fail for a promotion that was right.
FRESH_ANSWERS = 400


def _fresh_answers(server: RunningServer, users: Users, version: str, count: int, timeout: float) -> int:
    """Let the users go on until `version` gave `count` answers after now; returns where they start."""
    start = len(users.answers)
    deadline = time.monotonic() + timeout
    while sum(m == version for m, _, _ in users.answers[start:]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} answers from {version} in {timeout}s"
        assert server.process.poll() is None, server.log_text()[-3000:]
        time.sleep(0.5)
    return start


def answered_by(server: RunningServer) -> str:
    """The version that answers a request for the service alias."""
    answer = httpx.post(
        server.http_url + "/v1/completions",
        json={"model": "heed", "prompt": "Words:", "max_tokens": 4, "user": "anyone"},
        headers=server.headers("app"),
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["model"]


def test_feedback_that_favours_the_trained_policy_gets_it_promoted(
    base_policy: Path, tmp_path: Path, browser: Browser
) -> None:
    server, seen, users = run_loop(base_policy, tmp_path / "data", "promote", flip_after_publication=False)
    try:
        history = seen["final"]["history"]
        base, v2 = history[0]["version"], history[-1]["version"]  # initialised ... promoted
        started = next(d for d in history if d["action"] == "canary_started" and d["version"] == v2)
        assert started["by"] == "controller"
        print("decisions:", [(d["action"], d["version"]) for d in history])
        assert started["evidence"]["load_seconds"] < 10  # a swap into the warm canary slot
        promoted = seen["final"]["history"][-1]
        assert (promoted["action"], promoted["version"], promoted["by"]) == ("promoted", v2, "controller")
        assert promoted["evidence"]["p_canary_better"] >= 0.95
        assert promoted["evidence"]["canary"]["thumbs_up_rate"] > promoted["evidence"]["stable"]["thumbs_up_rate"]
        assert seen["final"]["stable"] == v2 and seen["final"]["slots"]["stable"]["policy_version"] == v2
        assert users.failures == []

        # The stable slot now answers as v2, and its answers carry more target words than base's did.
        assert answered_by(server) == v2
        # v2's answers, given after its promotion, carry more of the words people like than
        # base's did, by more than three standard errors (that people liked the canary's answers
        # more is the controller's evidence, checked above).
        fresh = users.answers[seen["promoted_at"] :]
        shares = {base: [s for m, s, _ in users.answers if m == base], v2: [s for m, s, _ in fresh if m == v2]}
        mean = {v: statistics.fmean(s) for v, s in shares.items()}
        stderr = math.sqrt(sum(statistics.variance(s) / len(s) for s in shares.values()))
        assert mean[v2] - mean[base] > 3 * stderr, (mean, stderr, {v: len(s) for v, s in shares.items()})
        liked = {v: [ok for m, _, ok in users.answers if m == v] for v in (base, v2)}

        manifest = PolicyRegistry(server.data.registry).manifest(v2)
        assert manifest.parent == base and manifest.source == "trainer" and manifest.watermark > 0
        assert manifest.evaluation["win_rate"] >= 0.65
        # The reward model learned the taste: it passed the gate's floor (0.65; one CI run's round 1
        # reached 0.70 on 64 held-out pairs, more than 3 standard errors above chance).
        assert manifest.evaluation["rm_heldout_accuracy"] >= float(TRAINER_ENV["HEED_TRAINER_MIN_RM_ACCURACY"])
        trainer = subprocess.run(
            [sys.executable, "-m", "heed", "trainer", "status", "--data-dir", str(server.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trainer.returncode == 0 and v2 in trainer.stdout

        # The dashboard tells the same story: both versions, the decisions, the trainer's round.
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        page = context.new_page()
        keys = {"heed.apiKey": KEYS["app"], "heed.adminKey": ADMIN["ops"]}
        page.add_init_script("".join(f"sessionStorage.setItem('{k}', '{v}');" for k, v in keys.items()))
        page.goto(server.http_url + "/ui/dashboard")
        expect(page.locator("#card-stable .value")).to_have_text(v2)
        expect(page.locator("#history tbody tr").first).to_contain_text("promoted")
        expect(page.locator("#history tbody")).to_contain_text("canary started")
        expect(page.locator(f"#versions tr[data-version='{base}'] [data-field='thumbs_up']")).to_have_text(
            str(sum(liked[base]))
        )
        expect(page.locator("#rounds tbody")).to_contain_text(f"published {v2}")
        page.screenshot(path=str(ARTIFACTS / "ui-dashboard-after-promotion.png"), full_page=True)
        context.close()
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log_text()[-3000:]


# The rollback and adapter mode's loop test what the service does with a round's version, not
# what the round learned (the promotion test's is): a small round on the first few hundred
# thumbs, with no floor but the gate's KL and entropy bounds. (At the promotion test's settings,
# the rollback tests took 303 s and 283 s in one CI run, mostly waiting for 3,500 feedback and
# training on them; and LoRA rounds on this tiny policy won 0.55 and 0.64 in a CI run, both
# rejected at the promotion test's 0.65, so that no canary came within 15 minutes.)
SMALL_ROUND_ENV = {
    "HEED_TRAINER_MIN_NEW_FEEDBACK": "400",
    "HEED_TRAINER_RM_MAX_EXAMPLES": "256",
    "HEED_TRAINER_RM_EPOCHS": "1",
    "HEED_TRAINER_PPO_ITERATIONS": "3",
    "HEED_TRAINER_MIN_RM_ACCURACY": "0",
    "HEED_TRAINER_RM_ACCURACY_MARGIN": "1",
    "HEED_TRAINER_MIN_THUMBS_AUC": "0",
    "HEED_TRAINER_MIN_WIN_RATE": "0",
}


def test_feedback_that_disfavours_the_canary_gets_it_rolled_back(base_policy: Path, tmp_path: Path) -> None:
    server, seen, users = run_loop(base_policy, tmp_path / "data", "rollback-full", True, "full", **SMALL_ROUND_ENV)
    try:
        base, v2 = seen["canary"]["stable"], seen["canary"]["canary"]
        manifest = PolicyRegistry(server.data.registry).manifest(v2)
        assert (manifest.mode, manifest.source, manifest.base) == ("full", "trainer", None)
        rolled_back = seen["final"]["history"][-1]
        assert (rolled_back["action"], rolled_back["version"], rolled_back["by"]) == ("rolled_back", v2, "controller")
        assert rolled_back["evidence"]["p_canary_worse"] >= 0.95
        assert seen["final"]["stable"] == base
        assert seen["final"]["slots"]["canary"]["policy_version"] == base  # back on stable's weights
        assert users.failures == []
        assert answered_by(server) == base
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log_text()[-3000:]


def test_in_adapter_mode_the_trainers_adapters_are_canaried_promoted_and_rolled_back(
    base_policy: Path, tmp_path: Path
) -> None:
    """Adapter mode's whole loop through the service, one engine throughout: round 1's adapter is
    canaried and promoted (its answers are liked more), round 2 trains on from it, and its adapter
    is canaried and rolled back (liked less); then stable answers as round 1's version."""
    server = start_loop_server(base_policy, tmp_path / "data", "adapter", "adapter", **SMALL_ROUND_ENV)
    # Until round 1 publishes, answers with more target words are liked (the reward model's data);
    # then each version is liked at its own rate, whatever it learned: v2 more than the base,
    # the version after it less than v2.
    liking: dict[str, float] = {}
    rng = random.Random("adapter-loop")

    def taste(version: str, share: float) -> bool:
        if not liking:
            return share >= 1 / 3
        return rng.random() < liking.get(version, 0.2)

    users = Users(server, taste)
    try:
        with users:
            first = wait_for(server, lambda s: s["canary"] is not None, 1200, "round 1's canary")
            base, v2 = first["stable"], first["canary"]
            liking.update({base: 0.5, v2: 0.9})
            promoted = wait_for(server, lambda s: s["canary"] is None, 300, "a decision on v2")
            assert (promoted["stable"], promoted["history"][-1]["action"]) == (v2, "promoted"), promoted["history"][-3:]
            second = wait_for(server, lambda s: s["canary"] not in (None, v2), 900, "round 2's canary")
            v3 = second["canary"]
            final = wait_for(server, lambda s: s["canary"] is None, 300, "a decision on v3")
        final = wait_for(server, _settled, 120, "both slots on the stable version")
        decisions = [(d["action"], d["version"], d["by"]) for d in final["history"]]
        print("decisions:", decisions)
        assert decisions[-4:] == [
            ("canary_started", v2, "controller"),
            ("promoted", v2, "controller"),
            ("canary_started", v3, "controller"),
            ("rolled_back", v3, "controller"),
        ]
        assert final["mode"] == "adapter" and final["stable"] == v2
        registry = PolicyRegistry(server.data.registry)
        for version, parent in ((v2, base), (v3, v2)):
            m = registry.manifest(version)
            assert (m.mode, m.source, m.base, m.parent) == ("adapter", "trainer", base, parent)
        assert final["history"][-2]["evidence"]["load_seconds"] < 10  # an adapter added, no engine started
        assert engine_cores(server) == 1
        assert users.failures == []
        assert answered_by(server) == v2
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log_text()[-3000:]
