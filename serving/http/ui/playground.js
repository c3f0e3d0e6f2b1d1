// The playground: a streamed chat with the served policy, and feedback on every answer.
import { $, el, flagBoxes, checkedFlags, header, meta, say, stream, submitFeedback } from "./common.js";

header("playground");

const transcript = $("#transcript");
const form = $("#composer");
const prompt = $("#prompt");
const status = $("#status");
let messages = []; // the conversation so far, as the chat API takes it

function userMessage(text) {
  transcript.append(el("div", { class: "message user" }, el("div", { class: "who" }, "you"), el("div", { class: "text" }, text)));
}

function feedbackBar(answer, flags) {
  const state = el("div", { class: "status", role: "status" });
  const comment = el("textarea", { rows: 2, placeholder: "A comment (optional)", "aria-label": "comment", class: "comment" });
  const better = el("textarea", { rows: 3, placeholder: "Write a better answer…", "aria-label": "better answer", class: "better" });
  const boxes = flagBoxes(flags, `flags-${answer.id}`);
  const extras = () => {
    const extra = {};
    if (comment.value.trim()) extra.comment = comment.value.trim();
    const ticked = checkedFlags(boxes);
    if (ticked.length) extra.flags = ticked;
    return extra;
  };
  const up = el("button", { type: "button", class: "thumb-up", title: "Good answer", "aria-label": "thumbs up" }, "▲ Good");
  const down = el("button", { type: "button", class: "thumb-down", title: "Bad answer", "aria-label": "thumbs down" }, "▼ Bad");
  const thumb = async (value, button) => {
    up.disabled = down.disabled = true;
    try {
      const saved = await submitFeedback({ completion_id: answer.id, choice_index: 0, thumb: value, ...extras() });
      button.classList.add("chosen");
      say(state, `Thanks: thumb ${value > 0 ? "up" : "down"} saved (${saved.id}).`, "ok");
    } catch (error) {
      up.disabled = down.disabled = false;
      say(state, error.message, "error");
    }
  };
  up.addEventListener("click", () => thumb(1, up));
  down.addEventListener("click", () => thumb(-1, down));
  const send = el("button", { type: "button", class: "send-correction" }, "Send better answer");
  send.addEventListener("click", async () => {
    const text = better.value.trim();
    if (!text) return say(state, "Write the better answer first.", "error");
    send.disabled = true;
    try {
      const saved = await submitFeedback({ completion_id: answer.id, choice_index: 0, correction: text, ...extras() });
      say(state, `Thanks: your answer was saved as a demonstration (${saved.id}).`, "ok");
      better.disabled = true;
    } catch (error) {
      send.disabled = false;
      say(state, error.message, "error");
    }
  });
  return el(
    "div",
    { class: "feedback" },
    el("div", { class: "row" }, up, down, el("span", { class: "small muted" }, "comment and flags below go with a thumb")),
    el("details", {}, el("summary", {}, "Comment, flags, a better answer"), comment, boxes, better, el("div", { class: "row" }, send)),
    state,
  );
}

async function ask(text) {
  messages.push({ role: "user", content: text });
  userMessage(text);
  const version = el("span", { class: "badge version", title: "the policy version that answered" }, "…");
  const body = el("div", { class: "text answer" });
  const box = el("div", { class: "message assistant" }, el("div", { class: "who" }, "heed", version), body);
  transcript.append(box);
  const answer = { id: null, text: "" };
  const request = {
    model: (await meta()).model,
    messages,
    stream: true,
    max_tokens: Number($("#max-tokens").value) || 128,
    temperature: Number($("#temperature").value),
  };
  await stream("/v1/chat/completions", request, (chunk) => {
    answer.id = chunk.id;
    version.textContent = chunk.model;
    box.dataset.completionId = chunk.id;
    box.dataset.version = chunk.model;
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) {
        answer.text += choice.delta.content;
        body.textContent = answer.text;
      }
    }
  });
  box.dataset.done = "true";
  if (!answer.text) body.append(el("span", { class: "muted" }, "(empty answer)"));
  messages.push({ role: "assistant", content: answer.text });
  box.append(feedbackBar(answer, (await meta()).flags));
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text) return;
  $("#send").disabled = true;
  say(status, "Answering…");
  try {
    await ask(text);
    prompt.value = "";
    say(status, "");
  } catch (error) {
    messages.pop();
    say(status, error.status === 401 ? `${error.message} (enter your API key at the top)` : error.message, "error");
  } finally {
    $("#send").disabled = false;
    prompt.focus();
  }
});
prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
});
$("#new-chat").addEventListener("click", () => {
  messages = [];
  transcript.replaceChildren();
  prompt.focus();
});
