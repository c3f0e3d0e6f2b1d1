// The rollout dashboard: versions and their traffic, feedback with its uncertainty, the canary's
// posterior, the decision history and the trainer's last rounds. Refreshes every 5 seconds.
import { $, adminKey, api, el, fixed, header, percent, say, when } from "./common.js";

header("dashboard", { admin: true });

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}
const text = (x, y, content, attrs = {}) => {
  const node = svg("text", { x, y, ...attrs });
  node.textContent = content;
  return node;
};

function card(label, value, detail, id) {
  return el("div", { class: "panel card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), detail ? el("div", { class: "small muted" }, detail) : null);
}

function cards(rollout) {
  const evidence = rollout.evidence || {};
  const steps = rollout.rule.steps;
  const p = rollout.canary ? evidence.p_canary_better : null;
  const meter = p === null || p === undefined ? null : el("div", { class: "meter", title: `P(canary better) = ${fixed(p, 3)}` }, el("div"));
  const canaryDetail = rollout.canary
    ? `${fixed(rollout.canary_share, 0)}% of traffic · step ${rollout.step + 1} of ${steps.length}${rollout.paused ? " · paused" : ""}`
    : "no canary";
  $("#cards").replaceChildren(
    card("stable", rollout.stable ?? "–", rollout.canary ? `${fixed(100 - rollout.canary_share, 0)}% of traffic` : "100% of traffic", "card-stable"),
    card("canary", rollout.canary ?? "none", canaryDetail, "card-canary"),
    card(
      "P(canary better)",
      p === null || p === undefined ? "–" : fixed(p, 3),
      rollout.canary
        ? `advance at ≥ ${rollout.rule.advance_probability}, roll back at ≤ ${fixed(1 - rollout.rule.rollback_probability, 2)}; ${evidence.canary_thumbs_this_step ?? 0} of ${rollout.rule.min_feedback_per_step} thumbs this step${rollout.rule.max_feedback_per_step ? ` (undecided at ${Math.max(rollout.rule.max_feedback_per_step, rollout.rule.min_feedback_per_step)}: rolled back)` : ""}`
        : "Beta-Binomial posterior on thumbs-up rates",
      "card-posterior",
    ),
    card("decisions", String(rollout.history.length), rollout.history.length ? `last: ${rollout.history.at(-1).action}` : "none yet", "card-decisions"),
  );
  // Widths through the CSSOM, which the Content-Security-Policy allows (inline style attributes it does not).
  if (meter) {
    $("#card-posterior").append(meter);
    meter.firstChild.style.width = `${100 * p}%`;
  }
}

function ratesPlot(versions) {
  const rows = versions.filter((v) => v.feedback.thumbs_up + v.feedback.thumbs_down > 0);
  const box = $("#rates-plot");
  if (!rows.length) return box.replaceChildren(el("p", { class: "small muted" }, "No thumbs yet."));
  const width = 640, left = 120, right = 20, rowH = 28, top = 24;
  const height = top + rows.length * rowH + 10;
  const x = (r) => left + r * (width - left - right);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": "thumbs-up rate per version with 95% intervals" });
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    plot.append(svg("line", { x1: x(tick), x2: x(tick), y1: top - 6, y2: height - 6, class: "axis" }), text(x(tick), 14, percent(tick), { "text-anchor": "middle" }));
  }
  rows.forEach((v, i) => {
    const y = top + i * rowH + rowH / 2;
    const f = v.feedback;
    const colour = v.role === "canary" ? "#b7791f" : v.role === "stable" ? "#1f8a4c" : "#6b6b70";
    plot.append(text(8, y + 4, v.version + (v.role ? ` (${v.role})` : "")));
    plot.append(svg("rect", { x: x(0), y: y - 8, width: x(f.thumbs_up_rate) - x(0), height: 16, fill: colour, opacity: 0.35 }));
    if (f.thumbs_up_interval) {
      const [lo, hi] = f.thumbs_up_interval;
      plot.append(svg("line", { x1: x(lo), x2: x(hi), y1: y, y2: y, stroke: colour, "stroke-width": 2 }));
      for (const end of [lo, hi]) plot.append(svg("line", { x1: x(end), x2: x(end), y1: y - 6, y2: y + 6, stroke: colour, "stroke-width": 2 }));
    }
    plot.append(svg("circle", { cx: x(f.thumbs_up_rate), cy: y, r: 4, fill: colour }));
  });
  box.replaceChildren(plot);
}

function versionsTable(versions) {
  $("#versions tbody").replaceChildren(
    ...versions.map((v) => {
      const f = v.feedback;
      const interval = f.thumbs_up_interval ? ` (${percent(f.thumbs_up_interval[0])}–${percent(f.thumbs_up_interval[1])})` : "";
      return el(
        "tr",
        { "data-version": v.version },
        el("td", {}, v.version),
        el("td", {}, v.role ? el("span", { class: `badge ${v.role}` }, v.role) : ""),
        el("td", { class: "num", "data-field": "traffic" }, `${fixed(v.traffic_percent, 0)}%`),
        el("td", { class: "num", "data-field": "thumbs_up" }, String(f.thumbs_up)),
        el("td", { class: "num", "data-field": "thumbs_down" }, String(f.thumbs_down)),
        el("td", { class: "num", "data-field": "thumbs_up_rate" }, percent(f.thumbs_up_rate) + interval),
        el("td", { class: "num", "data-field": "ratings" }, `${f.ratings}${f.rating_mean === null ? "" : ` (${fixed(f.rating_mean, 2)})`}`),
        el("td", { class: "num", "data-field": "rankings" }, String(f.rankings)),
        el("td", { class: "num", "data-field": "corrections" }, String(f.corrections)),
        el("td", { class: "num" }, v.evaluation && v.evaluation.win_rate !== undefined ? percent(v.evaluation.win_rate) : "–"),
        el("td", { class: "small" }, v.created ? `${when(v.created)} · ${v.source}` : "–"),
      );
    }),
  );
}

function historyTable(history) {
  $("#history tbody").replaceChildren(
    ...[...history].reverse().slice(0, 30).map((d) =>
      el(
        "tr",
        {},
        el("td", { class: "small" }, when(d.time)),
        el("td", {}, d.action.replace("_", " ")),
        el("td", {}, d.version ?? "–"),
        el("td", {}, d.by),
        el("td", { class: "num" }, `${fixed(d.share, 0)}%`),
        el("td", { class: "num" }, d.evidence && d.evidence.p_canary_better !== undefined ? fixed(d.evidence.p_canary_better, 3) : "–"),
        el("td", { class: "small" }, d.reason),
      ),
    ),
  );
  if (!history.length) $("#history tbody").append(el("tr", {}, el("td", { colspan: "7", class: "muted" }, "No decisions yet.")));
}

const gateValue = (round, name) => (round.gate || []).find((c) => c.name === name)?.value ?? null;

function roundsPlot(rounds) {
  const box = $("#rounds-plot");
  if (rounds.length < 1) return box.replaceChildren(el("p", { class: "small muted" }, "No rounds yet."));
  const width = 640, height = 180, left = 40, right = 130, top = 12, bottom = 28;
  const x = (i) => left + (rounds.length === 1 ? 0.5 : i / (rounds.length - 1)) * (width - left - right);
  const y = (v) => top + (1 - v) * (height - top - bottom);
  const plot = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": "reward-model accuracy and win rate per round" });
  for (const tick of [0, 0.5, 1]) plot.append(svg("line", { x1: left, x2: width - right, y1: y(tick), y2: y(tick), class: "axis" }), text(4, y(tick) + 4, percent(tick)));
  rounds.forEach((r, i) => plot.append(text(x(i), height - 8, `#${r.round}`, { "text-anchor": "middle" })));
  const series = [
    [(r) => r.heldout?.accuracy ?? null, "#2f5fd0", "RM held-out acc."],
    [(r) => r.heldout?.thumbs_auc ?? null, "#b5651d", "RM thumbs AUC"],
    [(r) => gateValue(r, "win_rate"), "#1f8a4c", "win rate"],
  ];
  series.forEach(([value, colour, label], s) => {
    const points = rounds.map((r, i) => [x(i), value(r)]).filter(([, v]) => v !== null);
    if (points.length > 1) plot.append(svg("polyline", { points: points.map(([px, v]) => `${px},${y(v)}`).join(" "), fill: "none", stroke: colour, "stroke-width": 2 }));
    for (const [px, v] of points) plot.append(svg("circle", { cx: px, cy: y(v), r: 3.5, fill: colour }));
    plot.append(svg("rect", { x: width - right + 12, y: top + s * 18, width: 10, height: 10, fill: colour }), text(width - right + 28, top + s * 18 + 9, label));
  });
  box.replaceChildren(plot);
}

// A round's data by kind, training and held-out callers together: "12 rankings · 240 thumbs · ...".
function feedbackKinds(data) {
  if (!data) return "–";
  const kinds = [["rankings", "rankings"], ["thumbs", "thumbs"], ["ratings", "ratings"], ["corrections", "corrections"]];
  return kinds.map(([key, label]) => `${(data[key] ?? 0) + (data[`heldout_${key}`] ?? 0)} ${label}`).join(" · ");
}

function trainer(t) {
  $("#trainer-summary").textContent = `${t.rounds_completed} rounds completed · log watermark ${t.watermark}${t.round_in_progress ? " · a round is in progress" : ""}`;
  roundsPlot(t.rounds);
  $("#rounds tbody").replaceChildren(
    ...[...t.rounds].reverse().map((r) =>
      el(
        "tr",
        { "data-round": String(r.round) },
        el("td", {}, String(r.round)),
        el("td", { class: "small" }, when(r.finished)),
        el("td", { class: "small" }, r.decision ?? "–"),
        el("td", { class: "num", "data-field": "feedback" }, String(r.data?.feedback_total ?? "–")),
        el("td", { class: "small", "data-field": "kinds" }, feedbackKinds(r.data)),
        el("td", { class: "num", "data-field": "rm_accuracy" }, percent(r.heldout?.accuracy ?? null, 1)),
        el("td", { class: "num", "data-field": "thumbs_auc" }, fixed(r.heldout?.thumbs_auc ?? null, 3)),
        el("td", { class: "num", "data-field": "thumbs_ece" }, fixed(r.heldout?.thumbs_ece ?? null, 3)),
        el("td", { class: "num", "data-field": "ratings_spearman" }, fixed(r.heldout?.ratings_spearman ?? null, 3)),
        el("td", { class: "num" }, percent(gateValue(r, "win_rate"), 1)),
        el("td", { class: "num" }, fixed(gateValue(r, "kl"), 3)),
        el("td", { class: "num" }, r.ppo?.first ? `${fixed(r.ppo.first.reward, 2)} → ${fixed(r.ppo.last.reward, 2)}` : "–"),
      ),
    ),
  );
}

function actions(data) {
  const section = $("#actions-section");
  section.hidden = !adminKey();
  if (section.hidden) return;
  const rollout = data.rollout;
  const status = el("span", { class: "status grow", role: "status" });
  const act = (action, body) => async () => {
    try {
      await api(`/admin/rollout/${action}`, { method: "POST", body: body ?? {}, admin: true });
      say(status, `${action}: done`, "ok");
      refresh();
    } catch (error) {
      say(status, `${action}: ${error.message}`, "error");
    }
  };
  const candidates = data.versions.filter((v) => !v.role && v.source);
  const pick = el("select", { "aria-label": "version to canary" }, candidates.map((v) => el("option", { value: v.version }, v.version)));
  $("#actions").replaceChildren(
    ...(rollout.canary
      ? [
          el("button", { type: "button", onclick: act("promote") }, `Promote ${rollout.canary}`),
          el("button", { type: "button", onclick: act("rollback") }, `Roll back ${rollout.canary}`),
          el("button", { type: "button", onclick: act(rollout.paused ? "resume" : "pause") }, rollout.paused ? "Resume" : "Pause"),
        ]
      : candidates.length
        ? [pick, el("button", { type: "button", onclick: () => act("canary", { version: pick.value })() }, "Start canary")]
        : [el("span", { class: "muted small" }, "No canary, and no other version to canary.")]),
    status,
  );
}

async function refresh() {
  try {
    const data = await api("/ui/api/dashboard", { admin: Boolean(adminKey()) }); // an admin key sees evidence, decisions and rounds
    cards(data.rollout);
    ratesPlot(data.versions);
    versionsTable(data.versions);
    historyTable(data.rollout.history);
    trainer(data.trainer);
    actions(data);
    $("#updated").textContent = `updated ${new Date(data.generated * 1000).toLocaleTimeString()}`;
    say($("#status"), "");
    document.body.dataset.loaded = "true";
  } catch (error) {
    say($("#status"), error.status === 401 ? `${error.message} (enter your API key at the top)` : error.message, "error");
  }
}

$("#refresh").addEventListener("click", refresh);
document.addEventListener("heed:keys", refresh);
setInterval(() => {
  if (!document.hidden) refresh();
}, 5000);
refresh();
