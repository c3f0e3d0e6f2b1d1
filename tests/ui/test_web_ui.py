"""The web page, driven in a real headless Chromium (Debian's, installed by `make test`) through
Playwright against a running server: the playground streams an answer and records a thumb and
a correction; the labeling page turns a keyboard-and-mouse ranking of 4 answers into one K-way
comparison; the dashboard shows the counts in the log. A screenshot of each page is kept in
test-artifacts/. Every request the pages make must go to the server itself (no CDN)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from heed.eventlog import EventStore, open_store
from heed.trainer_files import TrainerFiles
from tests.conftest import ARTIFACTS, RunningServer, start_server
from training.builders import build_from_event_log

KEYS = {"alice": "sk-ui-alice", "bob": "sk-ui-bob"}
ADMIN = {"ops": "sk-ui-admin-ops"}


@pytest.fixture(scope="module")
def ui_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = start_server(
        tiny_model, tmp_path_factory.mktemp("ui-data"), ARTIFACTS / "server-ui.log", KEYS, admin_keys=ADMIN
    )
    yield server
    server.stop()
    assert server.process.returncode == 0, server.log_text()[-3000:]


@pytest.fixture(scope="module")
def store(ui_server: RunningServer) -> Iterator[EventStore]:
    opened = open_store(ui_server.data.events)  # a second reader of the live log
    yield opened
    opened.close()


@pytest.fixture
def page(browser: Browser, ui_server: RunningServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    elsewhere: list[str] = []
    problems: list[str] = []
    opened.on("request", lambda r: None if r.url.startswith(ui_server.http_url) else elsewhere.append(r.url))
    opened.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # A refused call (401 with no key) is shown on the page; Chromium also logs it to the console.
    expected = "the server responded with a status of 401"
    opened.on(
        "console",
        lambda m: problems.append(f"console: {m.text}") if m.type == "error" and expected not in m.text else None,
    )
    yield opened
    context.close()
    assert elsewhere == [], "the page reached past its own server"
    assert problems == []


def enter_key(page: Page, key: str, admin: str | None = None) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # `change` saves it
    if admin is not None:
        page.fill("#admin-key", admin)
        page.press("#admin-key", "Tab")


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def api(server: RunningServer, principal: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=server.http_url, headers=server.headers(principal), timeout=60)


def test_the_playground_streams_an_answer_and_records_a_thumb_and_a_correction(
    page: Page, ui_server: RunningServer, store: EventStore
) -> None:
    page.goto(ui_server.http_url + "/ui/")
    enter_key(page, KEYS["alice"])
    page.fill("#prompt", "Name three colours.")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answered:
        page.keyboard.press("Control+Enter")
    assert answered.value.headers["content-type"].startswith("text/event-stream")  # streamed, as SSE
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-done", "true", timeout=60_000)
    completion_id, version = reply.get_attribute("data-completion-id"), reply.get_attribute("data-version")
    with api(ui_server) as http:
        served = [m["id"] for m in http.get("/v1/models").json()["data"]]
        logged = http.get(f"/v1/completions/{completion_id}").json()
    assert version in served and version != "heed" and logged["policy_version"] == version
    expect(reply.locator(".badge.version")).to_have_text(version)
    answer_text = logged["choices"][0]["text"]
    assert reply.locator(".answer").evaluate("node => node.textContent") == (answer_text or "(empty answer)")

    reply.locator(".thumb-up").click()
    expect(reply.locator(".feedback > .status")).to_contain_text("thumb up saved")
    thumbs = [f for f in store.feedback_for(completion_id) if f.kind == "thumb"]
    assert [(f.thumb, f.principal, f.policy_version) for f in thumbs] == [(1, "alice", version)]
    expect(reply.locator(".thumb-down")).to_be_disabled()  # one thumb per answer

    reply.locator("details summary").click()
    reply.locator("textarea.comment").fill("too short")
    reply.locator("input[data-flag='not_following_instruction']").check()
    reply.locator("textarea.better").fill("Red, green and blue.")
    reply.locator(".send-correction").click()
    expect(reply.locator(".feedback > .status")).to_contain_text("saved as a demonstration")
    (correction,) = [f for f in store.feedback_for(completion_id) if f.kind == "correction"]
    assert (correction.correction, correction.comment) == ("Red, green and blue.", "too short")
    assert tuple(correction.flags) == ("not_following_instruction",)
    demonstrations = build_from_event_log(store).demonstrations
    assert any(d.response == "Red, green and blue." for d in demonstrations)

    # A second turn carries the conversation.
    page.fill("#prompt", "And three more?")
    page.click("#send")
    expect(page.locator(".message.assistant").nth(1)).to_have_attribute("data-done", "true", timeout=60_000)
    second = store.get_completion(page.locator(".message.assistant").nth(1).get_attribute("data-completion-id") or "")
    assert second is not None and second.messages is not None and len(second.messages) == 3
    shot(page, "playground")


def test_the_playground_says_what_is_wrong_without_a_key(page: Page, ui_server: RunningServer) -> None:
    page.goto(ui_server.http_url + "/ui/")
    page.fill("#prompt", "Hello?")
    page.click("#send")
    expect(page.locator("#status")).to_contain_text("API key")
    expect(page.locator("#status")).to_have_class("status error")


def test_a_labeler_ranks_four_answers_with_keyboard_and_mouse_into_one_kway_comparison(
    page: Page, ui_server: RunningServer, store: EventStore
) -> None:
    prompt = "Write a short line about the sea."
    with api(ui_server) as http:  # the prompt pool holds what the caller's apps asked
        assert (
            http.post("/v1/completions", json={"model": "heed", "prompt": prompt, "max_tokens": 4}).status_code == 200
        )
    page.goto(ui_server.http_url + "/ui/label")
    enter_key(page, KEYS["alice"])
    expect(page.locator("#pool option").nth(1)).to_have_text(prompt)  # latest first
    page.click("#next-prompt")
    expect(page.locator("#label-prompt")).to_have_value(prompt)
    page.fill("#k", "4")
    page.click("#sample")
    items = page.locator("#ranking > li")
    expect(items).to_have_count(4, timeout=60_000)
    texts = {int(li.get_attribute("data-choice") or -1): li.locator(".answer").inner_text() for li in items.all()}
    assert sorted(texts) == [0, 1, 2, 3]

    # Keyboard: take the last answer to the top (Alt+Up three times), rate as we go down.
    items.nth(3).focus()
    for _ in range(3):
        page.keyboard.press("Alt+ArrowUp")
    assert order(page)[0] == 3
    # Mouse: drag the (now) last answer onto the top half of the second one.
    before = order(page)
    items.nth(3).locator(".rank").drag_to(items.nth(1), target_position={"x": 20, "y": 5})
    expected = [before[0], before[3], before[1], before[2]]
    assert order(page) == expected
    expect(page.locator("#ranking > li .rank")).to_have_text(["1", "2", "3", "4"])
    # Ratings with the keys 1-7 on the focused answer; arrows move the focus.
    items.nth(0).focus()
    for rating in ("7", "5", "3"):
        page.keyboard.press(rating)
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Control+Enter")  # one unrated: refused, and the focus goes to it
    expect(page.locator("#task-status")).to_contain_text("1 unrated")
    page.keyboard.press("1")
    # T ties the focused answer with the one above (the paper let labelers tie answers).
    items.nth(2).focus()
    page.keyboard.press("t")
    expect(page.locator("#ranking > li .rank")).to_have_text(["1", "2", "2", "4"])
    items.nth(3).locator("input[data-flag='made_up_facts']").check()
    items.nth(3).focus()
    page.keyboard.press("Control+Enter")
    expect(page.locator("#task-status")).to_contain_text("Saved: ranking")
    shot(page, "label")

    record = store.get_completion(page.locator("#ranking").get_attribute("data-completion-id") or "")
    # A logged completion prompt is asked again as it was logged: as a completion, n = 4.
    assert record is not None and (record.prompt, record.messages, len(record.choices)) == (prompt, None, 4)
    feedback = store.feedback_for(record.completion_id)
    (ranking,) = [f for f in feedback if f.kind == "ranking"]
    assert list(ranking.ranking or ()) == expected and ranking.ranks == (0, 1, 1, 2)
    ratings = {f.choice_index: (f.rating, tuple(f.flags)) for f in feedback if f.kind == "rating"}
    assert ratings == {
        expected[0]: (7, ()),
        expected[1]: (5, ()),
        expected[2]: (3, ()),
        expected[3]: (1, ("made_up_facts",)),
    }
    comparisons = [c for c in build_from_event_log(store).comparisons if c.responses[0] in texts.values()]
    assert len(comparisons) == 1
    assert list(comparisons[0].responses) == [texts[i] for i in expected]
    assert comparisons[0].ranks == (0, 1, 1, 2)  # the tied pair is not a preference


def order(page: Page) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all("#ranking > li", "items => items.map(i => i.dataset.choice)")]


def test_the_dashboard_shows_the_counts_in_the_log(page: Page, ui_server: RunningServer, store: EventStore) -> None:
    with api(ui_server, "bob") as http:
        answer = http.post("/v1/completions", json={"model": "heed", "prompt": "Hi", "max_tokens": 4}).json()
        for thumb in (1, 1, -1):
            sent = http.post("/v1/feedback", json={"completion_id": answer["id"], "thumb": thumb})
            assert sent.status_code == 201
    version = answer["model"]
    # A trainer round's report, as the trainer writes it: its data per kind and the reward model's
    # held-out metrics per kind.
    heldout = {"accuracy": None, "comparisons": 0, "thumbs_auc": 0.8125, "thumbs_ece": 0.0625, "thumbs": 40}
    data = {"feedback_total": 231.5, "rankings": 0, "thumbs": 300, "ratings": 50, "corrections": 12}
    report = {"round": 1, "decision": "published v2", "data": {**data, "heldout_thumbs": 40, "heldout_ratings": 6}}
    TrainerFiles.of(ui_server.data.root).write_report(1, {**report, "stages": {"reward_model": {"heldout": heldout}}})
    page.goto(ui_server.http_url + "/ui/dashboard")
    enter_key(page, KEYS["bob"], admin=ADMIN["ops"])
    expect(page.locator("body")).to_have_attribute("data-loaded", "true")
    row = page.locator(f"#versions tr[data-version='{version}']")
    summary = store.feedback_summary(0)[version]
    shown = {
        field: row.locator(f"[data-field='{field}']").inner_text()
        for field in ("thumbs_up", "thumbs_down", "rankings", "corrections")
    }
    assert shown == {
        "thumbs_up": str(summary.thumbs_up),
        "thumbs_down": str(summary.thumbs_down),
        "rankings": str(summary.rankings),
        "corrections": str(summary.corrections),
    }
    assert summary.thumbs_up >= 2 and summary.thumbs_down >= 1
    expect(row.locator("[data-field='traffic']")).to_have_text("100%")
    expect(row.locator("[data-field='thumbs_up_rate']")).to_contain_text(
        f"{round(100 * summary.thumbs_up / summary.thumbs)}%"
    )
    expect(page.locator("#card-stable .value")).to_have_text(version)
    expect(page.locator("#rates-plot svg circle")).to_have_count(1)
    expect(page.locator("#actions-section")).to_be_visible()  # an admin key was given
    round_row = page.locator("#rounds tr[data-round='1']")
    expect(round_row.locator("[data-field='feedback']")).to_have_text("231.5")
    expect(round_row.locator("[data-field='kinds']")).to_have_text(
        "0 rankings · 340 thumbs · 56 ratings · 12 corrections"
    )
    expect(round_row.locator("[data-field='rm_accuracy']")).to_have_text("–")
    expect(round_row.locator("[data-field='thumbs_auc']")).to_have_text("0.813")
    expect(round_row.locator("[data-field='thumbs_ece']")).to_have_text("0.063")

    # One more thumb, a refresh, and the count follows.
    with api(ui_server, "bob") as http:
        assert http.post("/v1/feedback", json={"completion_id": answer["id"], "thumb": 1}).status_code == 201
    page.click("#refresh")
    expect(row.locator("[data-field='thumbs_up']")).to_have_text(str(summary.thumbs_up + 1))
    shot(page, "dashboard")


def test_the_ui_endpoints_check_keys_and_input(ui_server: RunningServer) -> None:
    url = ui_server.http_url
    page_response = httpx.get(url + "/ui/label")
    assert page_response.status_code == 200 and "default-src 'self'" in page_response.headers["content-security-policy"]
    assert httpx.get(url + "/ui", follow_redirects=False).headers["location"] == "/ui/"
    script = httpx.get(url + "/ui/static/label.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(url + "/ui/static/nothing.js").status_code == 404
    meta = httpx.get(url + "/ui/api/meta").json()
    assert meta["api_key_required"] is True and "made_up_facts" in meta["flags"]

    unauthenticated = httpx.get(url + "/ui/api/dashboard")
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["code"] == "missing_api_key"
    as_admin = httpx.get(url + "/ui/api/dashboard", headers=ui_server.admin_headers()).json()
    assert as_admin["scope"] == "admin" and as_admin["rollout"]["history"]  # the "initialised" decision at least
    with api(ui_server, "alice") as alice:
        as_key = alice.get("/ui/api/dashboard").json()  # an API key sees what it may: no evidence nor decisions
    assert as_key["scope"] == "api_key" and as_key["rollout"]["history"] == [] and as_key["rollout"]["evidence"] == {}
    assert as_key["trainer"]["rounds"] == [] and as_key["rollout"]["stable"] == as_admin["rollout"]["stable"]
    with api(ui_server, "alice") as alice:
        assert (
            alice.post(
                "/v1/completions", json={"model": "heed", "prompt": "alice's secret", "max_tokens": 2}
            ).status_code
            == 200
        )
        bad = alice.get("/ui/api/prompts", params={"limit": "lots"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"
        assert alice.get("/ui/api/prompts", params={"limit": 0}).status_code == 400
    with api(ui_server, "bob") as bob:
        own = bob.get("/ui/api/prompts").json()
    assert own["scope"] == "own" and all(p["prompt"] != "alice's secret" for p in own["data"])
    everyone = httpx.get(url + "/ui/api/prompts", headers=ui_server.admin_headers()).json()
    assert everyone["scope"] == "all" and any(p["prompt"] == "alice's secret" for p in everyone["data"])
