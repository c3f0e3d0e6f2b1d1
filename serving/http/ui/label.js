// The labeling page: a prompt, K sampled answers, ranked by dragging or with the keyboard, each
// rated 1-7 and flagged; submitted as one ranking (a K-way comparison) and K ratings.
import { $, $$, api, checkedFlags, el, flagBoxes, header, meta, newIdempotencyKey, say, submitFeedback } from "./common.js";

header("label");

const pool = $("#pool");
const promptBox = $("#label-prompt");
const list = $("#ranking");
const taskStatus = $("#task-status");
let logged = []; // the prompt pool
let chosen = null; // the pool entry the prompt box holds, until it is edited
let task = null; // {completionId, version, keys: {ranking, ratings: {choice: key}}, submitted}

const promptText = (entry) =>
  entry.prompt ?? [...(entry.messages || [])].reverse().find((m) => m.role === "user")?.content ?? "";

async function loadPool() {
  try {
    const result = await api("/ui/api/prompts?limit=200");
    logged = result.data;
    pool.replaceChildren(
      el("option", { value: "" }, logged.length ? `${logged.length} logged prompts (${result.scope === "all" ? "all callers" : "yours"})` : "no logged prompts yet"),
      ...logged.map((entry, i) => el("option", { value: String(i) }, promptText(entry).slice(0, 120))),
    );
  } catch (error) {
    pool.replaceChildren(el("option", { value: "" }, `(pool unavailable: ${error.message})`));
  }
}

function pick(index) {
  chosen = logged[index] ?? null;
  pool.value = chosen ? String(index) : "";
  promptBox.value = chosen ? promptText(chosen) : "";
}
pool.addEventListener("change", () => pick(Number(pool.value)));
$("#next-prompt").addEventListener("click", () => {
  if (!logged.length) return say($("#setup-status"), "The pool is empty: type a prompt.", "error");
  pick(pool.value === "" ? 0 : (Number(pool.value) + 1) % logged.length);
});
promptBox.addEventListener("input", () => {
  chosen = null;
  pool.value = "";
});
document.addEventListener("heed:keys", loadPool);

// ---- sampling ---------------------------------------------------------------------------------
$("#setup").addEventListener("submit", async (event) => {
  event.preventDefault();
  const status = $("#setup-status");
  const k = Number($("#k").value);
  const info = await meta().catch(() => ({ model: "heed", max_n: 9 }));
  if (!(k >= 2 && k <= Math.min(9, info.max_n))) return say(status, `K must be between 2 and ${Math.min(9, info.max_n)}.`, "error");
  const text = promptBox.value.trim();
  if (!text) return say(status, "Type a prompt or pick one from the pool.", "error");
  const common = { model: info.model, n: k, temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value) || 96 };
  // A logged completion prompt is asked again as it was; anything else as a chat message.
  const plain = chosen && chosen.prompt !== null && chosen.prompt !== undefined && !chosen.messages;
  const [path, body] = plain
    ? ["/v1/completions", { ...common, prompt: chosen.prompt }]
    : ["/v1/chat/completions", { ...common, messages: chosen?.messages ?? [{ role: "user", content: text }] }];
  $("#sample").disabled = true;
  say(status, `Sampling ${k} answers…`);
  try {
    const result = await api(path, { method: "POST", body });
    const answers = result.choices.map((c) => ({ index: c.index, text: plain ? c.text : c.message.content }));
    render(result.id, result.model, answers, info);
    say(status, `${k} answers from ${result.model}.`, "ok");
  } catch (error) {
    say(status, error.message, "error");
  } finally {
    $("#sample").disabled = false;
  }
});

// ---- the ranking ------------------------------------------------------------------------------
function render(completionId, version, answers, info) {
  task = { completionId, version, keys: { ranking: newIdempotencyKey(), ratings: {} }, submitted: false, ties: !!info.ranking_ties };
  $(".tie-help").hidden = !task.ties;
  list.replaceChildren(...answers.map((answer) => item(answer, info)));
  list.dataset.completionId = completionId;
  delete list.dataset.submitted;
  renumber();
  $("#task").hidden = false;
  $("#submit-ranking").disabled = false;
  say(taskStatus, "");
  list.querySelector("li").focus();
}

function item(answer, info) {
  const li = el("li", { tabindex: "0", draggable: "true", "data-choice": String(answer.index), "aria-label": `answer ${answer.index + 1}` });
  const likert = el(
    "div",
    { class: "likert", role: "group", "aria-label": "rating, 1 (worst) to 7 (best)" },
    [1, 2, 3, 4, 5, 6, 7].map((n) =>
      el("button", { type: "button", "data-rating": String(n), "aria-pressed": "false", tabindex: "-1", onclick: () => rate(li, n) }, String(n)),
    ),
  );
  const tie = task.ties
    ? el("label", { class: "small" }, el("input", { type: "checkbox", class: "tie", onchange: renumber }), " tied with the one above")
    : null;
  li.append(
    el("div", { class: "rank", title: "drag to reorder" }, ""),
    el(
      "div",
      {},
      el("div", { class: "answer" }, answer.text || "(empty answer)"),
      el("div", { class: "row small" }, "rating", likert, tie),
      flagBoxes(info.flags || [], `flags-${answer.index}`),
    ),
  );
  li.addEventListener("keydown", (event) => keys(event, li));
  li.addEventListener("dragstart", (event) => {
    li.classList.add("dragging");
    event.dataTransfer.effectAllowed = "move";
    event.dataTransfer.setData("text/plain", li.dataset.choice);
  });
  li.addEventListener("dragend", () => {
    li.classList.remove("dragging");
    $$("li", list).forEach((x) => x.classList.remove("drop-before"));
  });
  li.addEventListener("dragover", (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = "move";
  });
  li.addEventListener("drop", (event) => {
    event.preventDefault();
    const moved = list.querySelector(`li[data-choice="${event.dataTransfer.getData("text/plain")}"]`);
    if (!moved || moved === li) return;
    const box = li.getBoundingClientRect();
    li.parentNode.insertBefore(moved, event.clientY < box.top + box.height / 2 ? li : li.nextSibling);
    renumber();
    moved.focus();
  });
  return li;
}

function rate(li, n) {
  li.dataset.rating = String(n);
  $$("[data-rating]", li).forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.rating === String(n))));
}

// Rank numbers, best first; an answer tied with the one above shares its number.
function renumber() {
  let rank = 0;
  $$("li", list).forEach((li, position) => {
    const tie = li.querySelector("input.tie");
    if (tie && position === 0) tie.checked = false;
    const tied = tie?.checked && position > 0;
    if (!tied) rank = position + 1;
    li.classList.toggle("tied", !!tied);
    li.querySelector(".rank").textContent = String(rank);
  });
}

function keys(event, li) {
  if (event.target !== li) return; // typing in a field of the item
  const move = (sibling, before) => {
    if (!sibling) return;
    list.insertBefore(li, before ? sibling : sibling.nextSibling);
    renumber();
    li.focus();
  };
  if (event.key === "ArrowUp" && event.altKey) move(li.previousElementSibling, true);
  else if (event.key === "ArrowDown" && event.altKey) move(li.nextElementSibling, false);
  else if (event.key === "ArrowUp") li.previousElementSibling?.focus();
  else if (event.key === "ArrowDown") li.nextElementSibling?.focus();
  else if (/^[1-7]$/.test(event.key) && !event.ctrlKey && !event.metaKey) rate(li, Number(event.key));
  else if ((event.key === "t" || event.key === "T") && task.ties) {
    const tie = li.querySelector("input.tie");
    tie.checked = !tie.checked;
    renumber();
  } else return;
  event.preventDefault();
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && task && !$("#task").hidden) {
    event.preventDefault();
    submit();
  }
});
$("#submit-ranking").addEventListener("click", submit);

// The ranking as the feedback API takes it: choice indices best first; a tie is a nested list.
function ranking() {
  const groups = [];
  for (const li of $$("li", list)) {
    const choice = Number(li.dataset.choice);
    if (li.classList.contains("tied")) groups[groups.length - 1].push(choice);
    else groups.push([choice]);
  }
  return groups.map((g) => (g.length === 1 ? g[0] : g));
}

async function submit() {
  if (!task || task.submitted) return;
  const items = $$("li", list);
  const unrated = items.filter((li) => !li.dataset.rating);
  if (unrated.length) {
    unrated[0].focus();
    return say(taskStatus, `Rate every answer first (${unrated.length} unrated).`, "error");
  }
  $("#submit-ranking").disabled = true;
  say(taskStatus, "Saving…");
  try {
    // Idempotency keys belong to the task: a retry after an error cannot count anything twice.
    const saved = await submitFeedback({ completion_id: task.completionId, ranking: ranking() }, task.keys.ranking);
    for (const li of items) {
      const choice = Number(li.dataset.choice);
      task.keys.ratings[choice] ??= newIdempotencyKey();
      const flags = checkedFlags(li);
      await submitFeedback(
        { completion_id: task.completionId, choice_index: choice, rating: Number(li.dataset.rating), ...(flags.length ? { flags } : {}) },
        task.keys.ratings[choice],
      );
    }
    task.submitted = true;
    say(taskStatus, `Saved: ranking ${saved.id} and ${items.length} ratings. Sample again for the next task.`, "ok");
    list.dataset.submitted = "true";
  } catch (error) {
    $("#submit-ranking").disabled = false;
    say(taskStatus, `${error.message} (submit again to retry: nothing counts twice)`, "error");
  }
}

loadPool();
