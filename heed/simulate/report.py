"""The experiment's report: results.md (tables) and results.png (plots) beside results.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    h, t, fb = results["heldout"], results["training_group"], results["feedback"]
    prompts = (
        f" Every prompt asked once: {fb['prompts_distinct']} distinct prompts, {fb['prompts_repeated']} repeated"
        + (f", from a space of {fb['prompt_space']}." if fb.get("prompt_space") else ".")
        if "prompts_distinct" in fb
        else ""
    )
    lines = [
        f"Start policy `{results['start_version']}`, final policy `{results['final_version']}`; "
        f"{results['seconds'] / 60:.0f} minutes; {fb.get('mode', 'labelers')} feedback: {fb['requests']} requests "
        f"({fb['thumbs']} thumbs, {fb.get('ratings', 0)} ratings, {fb.get('corrections', 0)} corrections, "
        f"{fb['rankings']} rankings, {fb['failures']} failed).{prompts}",
        "",
        "| judged by | win rate of final against start | 95% interval | prompts x judges |",
        "|---|---|---|---|",
        *(
            f"| {who} | {_pct(w['win_rate'])} | {_pct(w['low'])} – {_pct(w['high'])} | {w['prompts']} x {w['judges']} |"
            for who, w in (("held-out labelers (gave no feedback)", h), ("training labelers", t))
        ),
        *(
            [
                f"| held-out labelers, the undecided canary `{c['version']}` | {_pct(c['heldout']['win_rate'])} | "
                f"{_pct(c['heldout']['low'])} – {_pct(c['heldout']['high'])} | "
                f"{c['heldout']['prompts']} x {c['heldout']['judges']} |"
            ]
            if (c := results.get("candidate"))
            else []
        ),
        *(
            [
                f"| held-out labelers, KTO (same feedback) against start | {_pct(k['against_start']['win_rate'])} | "
                f"{_pct(k['against_start']['low'])} – {_pct(k['against_start']['high'])} | "
                f"{k['against_start']['prompts']} x {k['against_start']['judges']} |",
                f"| held-out labelers, final (PPO-ptx) against KTO, head to head | "
                f"{_pct(k['ppo_against_kto']['win_rate'])} | "
                f"{_pct(k['ppo_against_kto']['low'])} – {_pct(k['ppo_against_kto']['high'])} | "
                f"{k['ppo_against_kto']['prompts']} x {k['ppo_against_kto']['judges']} |",
            ]
            if (k := results.get("kto"))
            else []
        ),
        "",
        "| round | feedback | RM held-out acc. | RM thumbs AUC | RM thumbs ECE | RM win rate | KL "
        "| reward first → last | minutes | decision |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rounds"]:
        first, last = r["reward"]
        rm = r.get("rm_heldout") or {}
        lines.append(
            f"| {r['round']} | {r.get('feedback')} | {_pct(rm.get('accuracy'))} | {_num(rm.get('thumbs_auc'))} | "
            f"{_num(rm.get('thumbs_ece'))} | {_pct(r['win_rate_rm'])} | "
            f"{_num(r['kl'])} | {_num(first, 2)} → {_num(last, 2)} | {r['seconds'] / 60:.1f} | {r['decision']} |"
        )
    if not results["rounds"]:
        lines.append("| – | | | | | | | | | no round completed |")
    start, final = results["following"]["start"], results["following"]["final"]
    kto = (results.get("kto") or {}).get("following")
    if start or final:  # prompts without instructions (a custom task source) have none to count
        head = "| instruction kind | followed by start | followed by final |" + (" followed by KTO |" if kto else "")
        lines += ["", head, "|---|---|---|" + ("---|" if kto else "")]
        for kind in sorted(set(start) | set(final)):
            row = f"| {kind} | {_pct(start.get(kind))} | {_pct(final.get(kind))} |"
            lines.append(row + (f" {_pct(kto.get(kind))} |" if kto else ""))
    tax = results.get("tax")
    if tax:
        lines += [
            "",
            f"Alignment tax: NLL of {tax['heldout_texts']} held-out pretraining texts (start: {tax['nll_start']:.4f}).",
            "",
            "| PPO run | ptx gamma | NLL change | reward first → last | KL at the end |",
            "|---|---|---|---|---|",
        ]
        for name, run in tax["runs"].items():
            lines.append(
                f"| {name} | {run['ptx_coef']:g} | {run['nll_change']:+.4f} | "
                f"{_num(run['reward_first'], 2)} → {_num(run['reward_last'], 2)} | {_num(run['kl_last'])} |"
            )
    return "\n".join(lines) + "\n"


def _gaps(values: list[float | None]) -> list[float]:
    """``values`` for a line plot, a missing one as NaN (matplotlib leaves a gap)."""
    return [math.nan if v is None else v for v in values]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = [("held-out", results["heldout"]), ("training", results["training_group"])]
    ax = axes[0]
    for i, (_, w) in enumerate(groups):
        ax.bar(i, w["win_rate"], color="#2f5fd0" if i == 0 else "#9aa9d6")
        ax.errorbar(
            i, w["win_rate"], yerr=[[w["win_rate"] - w["low"]], [w["high"] - w["win_rate"]]], color="black", capsize=6
        )
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), [f"{n} labelers" for n, _ in groups])
    ax.set_ylim(0, 1)
    ax.set_title("win rate of final against start (95%)")

    ax = axes[1]
    rounds = results["rounds"]
    xs = [r["round"] for r in rounds]
    # A figure a round does not have (no held-out rankings in app mode; no PPO after a rejected
    # reward model) is a gap in its line, not a point at 0.
    accuracies = [r["rm_heldout_accuracy"] for r in rounds]
    if any(a is not None for a in accuracies):
        ax.plot(xs, _gaps(accuracies), "o-", label="RM held-out accuracy")
    aucs = [((r.get("rm_heldout") or {}).get("thumbs_auc")) for r in rounds]
    if any(a is not None for a in aucs):
        ax.plot(xs, _gaps(aucs), "d-", label="RM held-out thumbs AUC")
    ax.plot(xs, _gaps([r["win_rate_rm"] for r in rounds]), "s-", label="RM-judged win rate")
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_xticks(xs)
    twin = ax.twinx()
    twin.plot(xs, _gaps([r["kl"] for r in rounds]), "^--", color="#b7791f", label="KL (right)")
    twin.set_ylabel("KL (nats)")
    ax.legend(loc="lower left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    ax.set_title("trainer rounds")

    ax = axes[2]
    start, final = results["following"]["start"], results["following"]["final"]
    kinds = sorted(set(start) | set(final))
    ax.barh(
        [k for k in range(len(kinds))], [start.get(k, 0) for k in kinds], height=0.4, label="start", color="#bbbbbb"
    )
    ax.barh(
        [k + 0.4 for k in range(len(kinds))],
        [final.get(k, 0) for k in kinds],
        height=0.4,
        label="final",
        color="#1f8a4c",
    )
    ax.set_yticks([k + 0.2 for k in range(len(kinds))], kinds)
    ax.set_xlim(0, 1)
    if kinds:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "these prompts carry no instructions", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("instructions followed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "results.png")
