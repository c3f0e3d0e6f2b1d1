// What every page shares: the header with the key fields, calls to the server's own API with
// the caller's key, OpenAI-shaped errors, and server-sent events. Plain ES modules, no build.

const KEY = "heed.apiKey";
const ADMIN_KEY = "heed.adminKey";

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// The keys live in this browser's sessionStorage (gone with the tab), unless "remember" is ticked.
function stored(name) {
  return sessionStorage.getItem(name) ?? localStorage.getItem(name) ?? "";
}
function store(name, value, remember) {
  sessionStorage.setItem(name, value);
  if (remember) localStorage.setItem(name, value);
  else localStorage.removeItem(name);
}
export const apiKey = () => stored(KEY);
export const adminKey = () => stored(ADMIN_KEY);

export class ApiError extends Error {
  constructor(status, body) {
    const error = body && body.error ? body.error : { message: `HTTP ${status}` };
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type;
    this.code = error.code;
  }
}

function headers(admin, extra = {}) {
  const key = admin ? adminKey() : apiKey();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}), ...extra };
}

export async function api(path, { method = "GET", body, admin = false, extraHeaders } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(admin, extraHeaders),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: { message: text.slice(0, 200) } };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// POST a streaming request and call onChunk with every parsed `data:` event until [DONE].
export async function stream(path, body, onChunk) {
  const response = await fetch(path, { method: "POST", headers: headers(false), body: JSON.stringify(body) });
  if (!response.ok) {
    let data = null;
    try {
      data = await response.json();
    } catch {}
    throw new ApiError(response.status, data);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        const chunk = JSON.parse(payload);
        if (chunk.error) throw new ApiError(500, chunk);
        onChunk(chunk);
      }
    }
  }
}

// One idempotency key per user action: a retried submission cannot count twice.
// (crypto.randomUUID exists only in secure contexts: https or localhost.)
export const newIdempotencyKey = () =>
  [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");

export function submitFeedback(body, idempotencyKey = newIdempotencyKey()) {
  return api("/v1/feedback", { method: "POST", body, extraHeaders: { "Idempotency-Key": idempotencyKey } });
}

export function say(node, message, kind = "") {
  node.textContent = message;
  node.className = `status ${kind}`;
}

let metaPromise = null;
export function meta() {
  metaPromise ??= api("/ui/api/meta");
  return metaPromise;
}

export const flagLabel = (flag) => flag.replaceAll("_", " ");

export function flagBoxes(flags, name) {
  return el(
    "fieldset",
    { class: "flags", "aria-label": "flags" },
    flags.map((flag) =>
      el("label", {}, el("input", { type: "checkbox", name, value: flag, "data-flag": flag }), " ", flagLabel(flag)),
    ),
  );
}
export const checkedFlags = (root) => $$("input[data-flag]:checked", root).map((box) => box.value);

// The header: brand, the three pages, and the key fields.
export function header(current, { admin = false } = {}) {
  const pages = [
    ["playground", "/ui/", "Playground"],
    ["label", "/ui/label", "Label"],
    ["dashboard", "/ui/dashboard", "Dashboard"],
  ];
  const keyInput = el("input", {
    type: "password", id: "api-key", placeholder: "API key", autocomplete: "off", "aria-label": "API key",
    value: apiKey(),
  });
  const remember = el("input", { type: "checkbox", id: "remember-keys", checked: localStorage.getItem(KEY) !== null });
  const fields = [keyInput];
  let adminInput = null;
  if (admin) {
    adminInput = el("input", {
      type: "password", id: "admin-key", placeholder: "admin key (for actions)", autocomplete: "off",
      "aria-label": "admin key", value: adminKey(),
    });
    fields.push(adminInput);
  }
  const save = () => {
    store(KEY, keyInput.value.trim(), remember.checked);
    if (adminInput) store(ADMIN_KEY, adminInput.value.trim(), remember.checked);
    document.dispatchEvent(new CustomEvent("heed:keys"));
  };
  for (const input of fields) input.addEventListener("change", save);
  remember.addEventListener("change", save);
  const top = el(
    "header",
    { class: "top" },
    el("span", { class: "brand" }, "heed"),
    el(
      "nav",
      {},
      pages.map(([id, href, label]) => el("a", { href, "aria-current": id === current ? "page" : null }, label)),
    ),
    el("div", { class: "keys" }, ...fields, el("label", { class: "small muted" }, remember, " remember")),
  );
  document.body.prepend(top);
  meta().then((m) => {
    if (!m.api_key_required) keyInput.placeholder = "no key needed";
  }, () => {});
}

export const percent = (x, digits = 0) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(digits)}%`);
export const fixed = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
export const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
