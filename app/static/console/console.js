// Orchard console: status panel (polls /v1/system/status and /v1/models), a models panel, and a
// streaming chat playground with a model picker. Plain ES2020, no dependencies. Every API call
// carries the saved API key, if any. Server-provided strings (model ids, aliases, errors) are
// untrusted text: they go into the page through textContent only, never innerHTML.
"use strict";

(() => {
  const KEY_STORAGE = "orchard.apiKey";
  const POLL_MS = 2000;
  const AUTH_MESSAGE = "API key required: enter a valid key in the \u201cAPI key\u201d field above and press Save.";

  // picked: the model id the playground sends; pickedBy: "user", "loaded" (the first loaded chat
  // model, kept once chosen) or "fallback" (nothing loaded yet: re-chosen on the next refresh).
  const chat = { picked: "", pickedBy: "", messages: [], controller: null };
  const $ = (id) => document.getElementById(id);
  const el = {
    keyForm: $("key-form"), key: $("api-key"), banner: $("banner"), statusAge: $("status-age"),
    state: $("st-engine-state"), model: $("st-model-id"), running: $("st-running"), waiting: $("st-waiting"),
    tps: $("st-tps"), generated: $("st-generated"), batch: $("st-batch"), uptime: $("st-uptime"),
    rss: $("st-rss"), mlx: $("st-mlx"), kv: $("st-kv"), blas: $("st-blas"), version: $("st-version"),
    modelsList: $("models-list"), modelsCount: $("models-count"), modelSelect: $("model-select"),
    modelHint: $("model-hint"), transcript: $("transcript"), empty: $("transcript-empty"),
    chatError: $("chat-error"), form: $("chat-form"), message: $("message"), maxTokens: $("max-tokens"),
    temperature: $("temperature"), send: $("send-btn"), stop: $("stop-btn"), clear: $("clear-btn"),
  };

  // ---- API key + fetch ---------------------------------------------------------------

  function loadKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
  }
  function saveKey(value) {
    try {
      if (value) localStorage.setItem(KEY_STORAGE, value); else localStorage.removeItem(KEY_STORAGE);
    } catch { /* storage disabled: the key lives in the field only */ }
  }
  function authHeaders(extra = {}) {
    const key = el.key.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  // The message of an OpenAI error envelope {"error": {"message": ...}}, or a fallback.
  async function errorFrom(resp) {
    if (resp.status === 401) return new ApiError(401, AUTH_MESSAGE);
    let message = `HTTP ${resp.status} ${resp.statusText || ""}`.trim();
    try {
      const body = await resp.json();
      if (body && body.error) message = body.error.message || JSON.stringify(body.error);
    } catch { /* not JSON */ }
    if (resp.status === 403) message = `Forbidden: ${message}`;
    return new ApiError(resp.status, message);
  }

  async function apiJSON(path) {
    const resp = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    if (!resp.ok) throw await errorFrom(resp);
    return resp.json();
  }

  function showBanner(text) {
    el.banner.textContent = text || "";
    el.banner.hidden = !text;
  }

  // ---- status panel ------------------------------------------------------------------

  const dash = "\u2014";
  const get = (obj, path) => path.split(".").reduce((o, k) => (o == null ? undefined : o[k]), obj);
  const num = (v, digits = 0) => (typeof v === "number" && isFinite(v)
    ? v.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits }) : dash);

  function bytes(v) {
    if (typeof v !== "number" || !isFinite(v)) return dash;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(i === 0 ? 0 : v >= 100 ? 0 : 1)} ${units[i]}`;
  }

  function duration(s) {
    if (typeof s !== "number" || !isFinite(s)) return dash;
    s = Math.floor(s);
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, sec = s % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${sec}s`;
    return `${sec}s`;
  }

  function setState(state, title) {
    el.state.textContent = state;
    el.state.dataset.state = state;
    el.state.title = title || "";
  }

  function renderStatus(s) {
    const state = get(s, "engine.state") || "unknown";
    setState(state, get(s, "engine.error") || "");
    const modelId = get(s, "model.id");
    el.model.textContent = modelId || dash;
    el.running.textContent = num(get(s, "requests.running"));
    el.waiting.textContent = num(get(s, "requests.waiting"));
    el.tps.textContent = num(get(s, "tokens.per_second_10s"), 1);
    el.generated.textContent = num(get(s, "tokens.generated"));
    el.batch.textContent = `${num(get(s, "batch.current"))} / ${num(get(s, "batch.max_seen"))}`;
    el.uptime.textContent = duration(get(s, "uptime_s"));
    el.rss.textContent = bytes(get(s, "memory.rss_bytes"));
    el.mlx.textContent = bytes(get(s, "memory.mlx_active_bytes"));
    el.kv.textContent = bytes(get(s, "memory.kv_cache_bytes"));
    el.blas.textContent = get(s, "backend.blas") || dash;
    el.version.textContent = get(s, "version") || dash;
  }

  let pollTimer = null;
  let polling = false;    // a poll is in flight
  let pollAgain = false;  // ... and a fresh one was asked for meanwhile (after an answer, a pick)
  let lastOk = 0;

  // Refreshes the status and models panels now, then every POLL_MS (one poll in flight at a time).
  async function pollStatus() {
    clearTimeout(pollTimer);
    if (polling) { pollAgain = true; return; }  // the poll in flight schedules the next one
    polling = true;
    pollAgain = false;
    try {
      const [status, list] = await Promise.all([apiJSON("/v1/system/status"), apiJSON("/v1/models")]);
      renderStatus(status);
      renderModels(mergeModels(list, status));
      lastOk = Date.now();
      showBanner("");
    } catch (err) {
      if (err.status === 401) {
        setState("unauthorized");
        showBanner(AUTH_MESSAGE);
      } else if (err instanceof ApiError) {
        setState("error", err.message);
        showBanner(`Status unavailable: ${err.message}`);
      } else {
        setState("unreachable");
        showBanner("Cannot reach the Orchard server; retrying every 2 s.");
      }
    } finally {
      polling = false;
    }
    updateAge();
    pollTimer = setTimeout(pollStatus, pollAgain ? 0 : POLL_MS);
  }

  function updateAge() {
    el.statusAge.textContent = lastOk ? `updated ${new Date(lastOk).toLocaleTimeString()}` : "";
  }

  // ---- models panel + picker ---------------------------------------------------------

  // One row per configured model: /v1/models (order, kind, aliases, size) joined by id with
  // status.models (running/waiting, error). A single-model or older server sends ids only.
  function mergeModels(list, status) {
    const live = new Map((Array.isArray(get(status, "models")) ? status.models : []).map((m) => [m.id, m]));
    const rows = list && Array.isArray(list.data) ? list.data : [];
    return rows.filter((m) => m && typeof m.id === "string" && m.id).map((m) => {
      const s = live.get(m.id) || {};
      const remote = m.owned_by === "remote" || Boolean(s.remote);
      return {
        id: m.id, kind: m.kind || s.kind || "chat", state: m.state || s.state || (remote ? "remote" : "unknown"),
        remote, size: m.size_bytes ?? s.weight_bytes, pinned: m.pinned ?? s.pinned,
        aliases: Array.isArray(m.aliases) ? m.aliases.map(String) : [], context: m.context_length,
        running: s.running, waiting: s.waiting, generated: s.generated_tokens, error: s.error || "",
      };
    });
  }

  function span(className, text) {
    const node = document.createElement("span");
    node.className = className;
    node.textContent = text;
    return node;
  }

  function modelItem(m) {
    const item = document.createElement("li");
    item.className = "model";
    item.dataset.modelId = m.id;
    item.dataset.state = m.state;
    const badge = span("pill", m.state);
    badge.dataset.state = m.state;
    if (m.error) badge.title = m.error;
    const head = document.createElement("div");
    head.className = "model-head";
    head.append(span("model-id", m.id), badge);

    const facts = document.createElement("div");
    facts.className = "model-facts";
    facts.append(span("model-kind", m.kind));
    if (m.remote) facts.append(span("model-size", "remote"));
    else if (m.size > 0) facts.append(span("model-size", bytes(m.size)));  // 0: not known until loaded
    if (m.pinned) facts.append(span("model-pinned", "pinned"));
    if (typeof m.context === "number") facts.append(span("model-context", `${num(m.context)} ctx`));
    item.append(head, facts);

    if (!m.remote) {
      const load = document.createElement("div");
      load.className = "model-load";
      load.append("running ", span("model-running", num(m.running)),
                  " \u00b7 waiting ", span("model-waiting", num(m.waiting)),
                  " \u00b7 tokens ", span("model-generated", num(m.generated)));
      item.append(load);
    }
    if (m.aliases.length) {
      const aliases = document.createElement("div");
      aliases.className = "model-aliases";
      aliases.append("aliases: ", span("model-alias-list", m.aliases.join(", ")));
      item.append(aliases);
    }
    return item;
  }

  function renderModels(models) {
    el.modelsCount.textContent = models.length ? `(${models.length})` : "";
    if (!models.length) {
      const none = document.createElement("li");
      none.className = "hint";
      none.textContent = "The server lists no model.";
      el.modelsList.replaceChildren(none);
    } else {
      el.modelsList.replaceChildren(...models.map(modelItem));
    }
    renderPicker(models);
  }

  // The picker offers chat models only (embedding models cannot chat). It keeps the user's pick
  // while that model exists; otherwise it settles on the first loaded chat model.
  function renderPicker(models) {
    const chatModels = models.filter((m) => m.kind !== "embedding");
    const ids = chatModels.map((m) => m.id);
    if (!ids.includes(chat.picked) || chat.pickedBy === "fallback") {
      const loaded = chatModels.find((m) => m.state === "loaded");
      chat.picked = loaded ? loaded.id : ids[0] || "";
      chat.pickedBy = loaded ? "loaded" : "fallback";
    }
    const sel = el.modelSelect;
    const same = sel.options.length === ids.length && ids.every((id, i) => sel.options[i].value === id);
    if (!same) sel.replaceChildren(...ids.map((id) => new Option(id, id)));  // Option() sets text, not HTML
    chatModels.forEach((m, i) => {
      const label = m.state === "loaded" || m.state === "unknown" ? m.id : `${m.id} (${m.state})`;
      if (sel.options[i].textContent !== label) sel.options[i].textContent = label;
    });
    sel.value = chat.picked;
    sel.disabled = !ids.length;
    const current = chatModels.find((m) => m.id === chat.picked);
    showModelHint(current);
  }

  function showModelHint(m) {
    const hints = { unloaded: "loads on first use", loading: "loading\u2026", failed: "failed to load" };
    const text = (m && hints[m.state]) || "";
    el.modelHint.textContent = text;
    el.modelHint.hidden = !text;
  }

  // ---- chat playground ---------------------------------------------------------------

  async function currentModel() {
    if (!chat.picked) renderPicker(mergeModels(await apiJSON("/v1/models"), null));
    if (!chat.picked) throw new ApiError(503, "The server lists no chat model.");
    return chat.picked;
  }

  function showChatError(text) {
    el.chatError.textContent = text || "";
    el.chatError.hidden = !text;
  }

  function addMessage(role, text) {
    el.empty.hidden = true;
    const box = document.createElement("div");
    box.className = `msg ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "You" : "Assistant";
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    box.append(label, content);
    el.transcript.append(box);
    scrollDown();
    return { box, content };
  }

  function addNote(box, text) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = text;
    box.append(note);
  }

  function scrollDown() { el.transcript.scrollTop = el.transcript.scrollHeight; }

  function setBusy(busy) {
    el.send.disabled = busy;
    el.stop.disabled = !busy;
    el.clear.disabled = busy;
    el.form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function numberField(input, fallback, min, max, integer) {
    let v = Number(input.value);
    if (input.value === "" || !isFinite(v)) v = fallback;
    v = Math.min(max, Math.max(min, integer ? Math.round(v) : v));
    input.value = String(v);
    return v;
  }

  // Reads an SSE body: calls onEvent(parsedJSON) for each `data: {...}` event; resolves on [DONE] or EOF.
  async function readSSE(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let dataLines = [];
    const dispatch = () => {
      if (!dataLines.length) return false;
      const data = dataLines.join("\n");
      dataLines = [];
      if (data.trim() === "[DONE]") return true;
      let event;
      try { event = JSON.parse(data); } catch { return false; }  // ignore malformed events
      onEvent(event);
      return false;
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          let line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (line.endsWith("\r")) line = line.slice(0, -1);
          if (line === "") {                       // blank line ends an event
            if (dispatch()) return;
          } else if (line.startsWith("data:")) {
            dataLines.push(line.slice(5).replace(/^ /, ""));
          }                                        // ":" comments (keep-alives), other fields: ignored
        }
        if (done) { if (buffer.startsWith("data:")) dataLines.push(buffer.slice(5).trim()); dispatch(); return; }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  async function send(text) {
    showChatError("");
    const maxTokens = numberField(el.maxTokens, 128, 1, 32768, true);
    const temperature = numberField(el.temperature, 0.7, 0, 2, false);
    chat.messages.push({ role: "user", content: text });
    addMessage("user", text);
    const { box, content } = addMessage("assistant", "");
    box.dataset.state = "streaming";
    box.setAttribute("aria-busy", "true");
    const controller = new AbortController();
    chat.controller = controller;
    setBusy(true);

    let answer = "";
    let finish = null;
    let failure = null;
    try {
      const model = await currentModel();
      box.dataset.model = model;
      box.querySelector(".role").textContent = `Assistant \u00b7 ${model}`;
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify({ model, messages: chat.messages, stream: true, max_tokens: maxTokens, temperature }),
        signal: controller.signal,
      });
      if (!resp.ok) throw await errorFrom(resp);
      if (!resp.body) throw new Error("This browser cannot read streamed responses.");
      const textNode = document.createTextNode("");
      content.append(textNode);
      await readSSE(resp.body, (event) => {
        if (event.error) {
          failure = new ApiError(500, event.error.message || JSON.stringify(event.error));
          return;
        }
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          answer += piece;
          textNode.appendData(piece);
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
    } catch (err) {
      failure = err;
    } finally {
      chat.controller = null;
      box.removeAttribute("aria-busy");
      setBusy(false);
      pollStatus();  // the panel shows the model's new state (loaded on demand) and counters now
    }

    const aborted = failure && failure.name === "AbortError";
    if (answer) chat.messages.push({ role: "assistant", content: answer });
    if (aborted) {
      box.dataset.state = "stopped";
      addNote(box, "Stopped.");
    } else if (failure) {
      box.dataset.state = "error";
      const message = failure instanceof ApiError ? failure.message
        : `Request failed: ${failure.message || failure}`;
      addNote(box, `Error: ${message}`);
      showChatError(message);
      if (failure.status === 401) showBanner(AUTH_MESSAGE);
      if (!answer) {               // nothing came back: let the user retry the same turn
        chat.messages.pop();
        el.message.value = el.message.value || text;
      }
    } else {
      box.dataset.state = "done";
      if (!answer) addNote(box, "(empty answer)");
      if (finish === "length") addNote(box, `Stopped at max tokens (${maxTokens}).`);
    }
    scrollDown();
  }

  // ---- wiring ------------------------------------------------------------------------

  el.form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = el.message.value.trim();
    if (!text || chat.controller) return;
    el.message.value = "";
    send(text);
  });

  el.message.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      el.form.requestSubmit(el.send);
    }
  });

  el.modelSelect.addEventListener("change", () => {
    chat.picked = el.modelSelect.value;
    chat.pickedBy = "user";
    showModelHint(null);  // the next refresh (now) shows the new model's state
    pollStatus();
  });

  el.stop.addEventListener("click", () => { if (chat.controller) chat.controller.abort(); });

  el.clear.addEventListener("click", () => {
    chat.messages = [];
    el.transcript.querySelectorAll(".msg").forEach((n) => n.remove());
    el.empty.hidden = false;
    showChatError("");
    el.message.focus();
  });

  el.keyForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    saveKey(el.key.value.trim());
    showChatError("");
    pollStatus();
  });

  el.key.value = loadKey();
  setBusy(false);
  pollStatus();
})();
