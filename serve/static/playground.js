// The playground: talks to this server's own OpenAI-compatible API (relative URLs, nothing from elsewhere).
"use strict";

const KEY_STORE = "neodeploy-api-key";
const $ = (id) => document.getElementById(id);
const state = { model: null, chat: false, mode: "completion", messages: [], controller: null, key: null };

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  const banner = $("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// ------------------------------------------------------------------------------------------- the model

async function needsKey() {
  // /health is open: it says whether a key is needed, so the page asks before it is refused.
  try {
    const health = await (await fetch("health")).json();
    return health.api_key_required && !sessionStorage.getItem(KEY_STORE);
  } catch (e) {
    return false;
  }
}

function askForKey() {
  $("key-form").hidden = false;
  $("model-name").textContent = "needs a key";
  $("api-key").focus();
}

async function loadModel() {
  if (await needsKey()) {
    askForKey();
    return;
  }
  let response;
  try {
    response = await fetch("v1/models", { headers: headers(false) });
  } catch (e) {
    showError("The server cannot be reached.");
    setTimeout(loadModel, 2000);
    return;
  }
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("model-name").textContent = "needs a key";
    if (sessionStorage.getItem(KEY_STORE)) showError(await errorMessage(response));
    $("api-key").focus();
    return;
  }
  if (response.status === 503) {
    showError(await errorMessage(response));
    setTimeout(loadModel, 1000);
    return;
  }
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  showError("");
  $("key-form").hidden = true;
  const card = (await response.json()).data[0];
  state.model = card.id;
  state.chat = Boolean(card.neodeploy && card.neodeploy.chat_template);
  $("model-name").textContent = card.id;
  $("mode-chat").hidden = !state.chat;
  setMode(state.chat ? "chat" : "completion");
  showFacts(card);
}

function showFacts(card) {
  const info = card.neodeploy || {};
  const check = info.check || {};
  const rows = [
    ["Family", info.family],
    ["Parameters", info.parameters && count(info.parameters)],
    ["Precision", info.precision],
    ["Target", info.target],
    ["Context", card.max_model_len + " tokens"],
    ["Backend", info.backend],
    ["Golden check", check.skipped ? "skipped" : check.passed ? `passed (${check.cases} cases, ${check.seconds} s)` : "–"],
    ["Chat template", info.chat_template ? "yes" : "none"],
  ];
  const facts = $("facts");
  facts.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value === undefined || value === null ? "–" : String(value);
    facts.append(dt, dd);
  }
}

function count(n) {
  // as `neodeploy inspect` writes a parameter count (reference/spec.py human_count): 14.1M, 1.41B
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "B";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  return n >= 1e3 ? (n / 1e3).toFixed(1) + "K" : String(n);
}

function setMode(mode) {
  state.mode = mode;
  $("mode-chat").setAttribute("aria-pressed", String(mode === "chat"));
  $("mode-completion").setAttribute("aria-pressed", String(mode === "completion"));
  $("prompt").placeholder = mode === "chat" ? "Message the model; Ctrl+Enter sends" : "Text to continue; Ctrl+Enter sends";
}

// ------------------------------------------------------------------------------------------- a request

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function requestBody(prompt) {
  const body = { model: state.model, stream: true, stream_options: { include_usage: true } };
  for (const id of ["temperature", "top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "frequency_penalty",
                    "presence_penalty"]) {
    const value = number(id);
    if (value !== null) body[id] = value;
  }
  const stops = $("stop-strings").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stops.length) body.stop = stops;
  const schema = $("json-schema").value.trim();
  if (schema) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (e) { throw new Error("The JSON schema is not valid JSON: " + e.message); }
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: parsed } };
  }
  if (state.mode === "chat") body.messages = [...state.messages, { role: "user", content: prompt }];
  else body.prompt = prompt;
  return body;
}

function addTurn(kind, who, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + kind;
  const label = document.createElement("div");
  label.className = "who";
  label.textContent = who;
  const body = document.createElement("div");
  body.className = "text";
  if (text) body.textContent = text;
  const meta = document.createElement("div");
  meta.className = "meta";
  turn.append(label, body, meta);
  $("log").append(turn);
  turn.scrollIntoView({ block: "end" });
  return { turn, body, meta };
}

function setStats(tokens, rate, ttft, finish) {
  $("stat-tokens").textContent = tokens;
  $("stat-rate").textContent = rate;
  $("stat-ttft").textContent = ttft;
  $("stat-finish").textContent = finish;
}

async function send(event) {
  event.preventDefault();
  if (state.controller || !state.model) return;
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  let body;
  try { body = requestBody(prompt); } catch (e) { showError(e.message); return; }
  showError("");
  const chat = state.mode === "chat";
  if (chat) addTurn("user", "You", prompt);
  const answer = addTurn(chat ? "assistant" : "completion", chat ? "Model" : "Completion", "");
  if (!chat) {
    const echo = document.createElement("span");
    echo.className = "prompt-echo";
    echo.textContent = prompt;
    answer.body.append(echo);
  }
  const output = document.createElement("span");
  output.className = "output";
  answer.body.append(output);

  const controller = new AbortController();
  state.controller = controller;
  $("send").disabled = true;
  $("stop").disabled = false;
  setStats("…", "…", "…", "…");
  const started = performance.now();
  let first = null, chunks = 0, usage = null, finish = null, text = "";
  try {
    const response = await fetch(chat ? "v1/chat/completions" : "v1/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: controller.signal });
    if (!response.ok) {
      const message = await errorMessage(response);
      answer.turn.remove();
      showError(message);
      if (response.status === 401) loadModel();
      finish = "error";
      return;
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
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) { showError(event.error.message); finish = "error"; continue; }
        if (event.usage) usage = event.usage;
        for (const c of event.choices || []) {
          const piece = chat ? (c.delta && c.delta.content) || "" : c.text || "";
          if (c.delta && c.delta.tool_calls) text += JSON.stringify(c.delta.tool_calls);
          if (piece) {
            if (first === null) first = performance.now();
            text += piece;
            output.textContent = text;
            const log = $("log");
            if (log.scrollHeight - log.scrollTop - log.clientHeight < 80) log.scrollTop = log.scrollHeight;
          }
          if (!(chat && c.delta && c.delta.role && !piece)) chunks += 1;
          if (c.finish_reason) finish = c.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "cancelled";
    else { showError(e.message); finish = "error"; }
  } finally {
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const decode = first !== null && tokens > 1 ? (tokens - 1) / ((ended - first) / 1000) : null;
    setStats(String(tokens), decode === null ? "–" : decode.toFixed(1),
             first === null ? "–" : `${Math.round(first - started)} ms`, finish || "–");
    answer.meta.textContent = finish && finish !== "error" ? `${tokens} tokens · ${finish}` : "";
    if (chat && finish && finish !== "error") {
      state.messages.push({ role: "user", content: prompt }, { role: "assistant", content: text });
    }
    if (finish !== "error") $("prompt").value = "";
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (state.controller) state.controller.abort();  // the server sees the connection close and frees the slot
}

// ------------------------------------------------------------------------------------------- the live panel

const live = { tokens: null, at: 0 };

async function pollMetrics() {
  try {
    const response = await fetch("metrics");
    if (response.ok) {
      const text = await response.text();
      const value = (name) => {
        const m = text.match(new RegExp("^" + name + " ([0-9.eE+-]+)$", "m"));
        return m ? Number(m[1]) : null;
      };
      const running = value("neodeploy_running_requests"), waiting = value("neodeploy_waiting_requests");
      $("live-running").textContent = running === null ? "–" : String(running);
      $("live-waiting").textContent = waiting === null ? "–" : String(waiting);
      const tokens = value("neodeploy_generation_tokens_total"), now = performance.now();
      if (tokens !== null && live.tokens !== null && now > live.at) {
        $("live-rate").textContent = ((tokens - live.tokens) / ((now - live.at) / 1000)).toFixed(1);
      }
      live.tokens = tokens;
      live.at = now;
    }
  } catch (e) { /* the server is restarting: try again */ }
  setTimeout(pollMetrics, 1500);
}

// ------------------------------------------------------------------------------------------- wiring

document.addEventListener("DOMContentLoaded", () => {
  $("prompt-form").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => { $("log").replaceChildren(); state.messages = []; });
  $("mode-chat").addEventListener("click", () => setMode("chat"));
  $("mode-completion").addEventListener("click", () => setMode("completion"));
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("prompt-form").requestSubmit();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("api-key").value = "";
    loadModel();
  });
  loadModel();
  pollMetrics();
});
