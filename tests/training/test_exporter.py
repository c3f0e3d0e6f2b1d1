"""The trainer's /metrics: what the round reports say, over a real HTTP server, as Prometheus parses it."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from heed.trainer_files import TrainerFiles
from training.exporter import TrainerMetrics, decision_of


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_decisions_are_read_as_one_word() -> None:
    assert decision_of({"decision": "published v3"}) == "published"
    assert decision_of({"decision": "rejected: win rate 0.40 < 0.55"}) == "rejected"
    assert decision_of({"decision": "skipped: the estimated memory ..."}) == "skipped"
    assert decision_of({"round": 4}) == ""  # in progress: no decision yet


def test_the_metrics_follow_the_round_reports_across_a_restart(tmp_path: Path) -> None:
    files = TrainerFiles(tmp_path / "trainer")
    files.write_report(1, {"round": 1, "started": 100.0, "finished": 160.0, "decision": "published v2"})
    files.write_report(2, {"round": 2, "started": 200.0, "finished": 290.0, "decision": "rejected: win rate low"})
    metrics = TrainerMetrics(files)
    metrics.needed.set(64)
    metrics.pending.set(12.5)
    server = metrics.serve(0, "127.0.0.1")
    try:
        port = server.server_port
        first = scrape(port)
        files.write_report(3, {"round": 3, "started": 300.0, "decision": "skipped: memory"})
        second = scrape(port)  # read at each scrape: a new report shows without a restart
    finally:
        server.shutdown()
        server.server_close()

    assert first[("heed_trainer_rounds_total", (("decision", "published"),))] == 1
    assert first[("heed_trainer_rounds_total", (("decision", "rejected"),))] == 1
    assert first[("heed_trainer_rounds_total", (("decision", "skipped"),))] == 0
    assert first[("heed_trainer_rounds_since_published", ())] == 1
    assert first[("heed_trainer_last_round_end_timestamp_seconds", ())] == 290.0
    assert first[("heed_trainer_last_round_duration_seconds", ())] == 90.0
    assert first[("heed_trainer_feedback_pending", ())] == 12.5
    assert first[("heed_trainer_feedback_needed", ())] == 64
    assert first[("heed_trainer_round_running", ())] == 0
    assert first[("heed_trainer_last_round_skipped", ())] == 0
    assert second[("heed_trainer_last_round_skipped", ())] == 1
    assert second[("heed_trainer_rounds_since_published", ())] == 2
    assert second[("heed_trainer_rounds_total", (("decision", "skipped"),))] == 1
    assert second[("heed_trainer_last_round_duration_seconds", ())] == 0  # a skipped round trains nothing
    assert second[("heed_trainer_last_round_end_timestamp_seconds", ())] == 300.0


def test_round_ten_thousand_comes_after_round_9999_and_a_rewritten_report_is_read_again(tmp_path: Path) -> None:
    files = TrainerFiles(tmp_path / "trainer")
    files.write_report(9999, {"round": 9999, "started": 100.0, "finished": 160.0, "decision": "published v2"})
    files.write_report(10000, {"round": 10000, "started": 200.0, "finished": 230.0, "decision": "rejected: low"})
    assert [r["round"] for r in files.reports()] == [9999, 10000]
    assert [r["round"] for r in files.reports(last=1)] == [10000]
    metrics = TrainerMetrics(files)
    server = metrics.serve(0, "127.0.0.1")
    try:
        first = scrape(server.server_port)
        files.write_report(10000, {"round": 10000, "started": 200.0, "finished": 250.0, "decision": "published v3"})
        second = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert first[("heed_trainer_last_round_end_timestamp_seconds", ())] == 230.0
    assert first[("heed_trainer_rounds_since_published", ())] == 1
    assert second[("heed_trainer_last_round_end_timestamp_seconds", ())] == 250.0
    assert second[("heed_trainer_rounds_total", (("decision", "published"),))] == 2
