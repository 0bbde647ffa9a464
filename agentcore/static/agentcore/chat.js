// The chat page: conversations over the REST API (/api/sessions/), turns streamed over the agent's WebSocket
// (/ws/agent/sessions/<id>/: chat, approval and stop messages in; run_started, delta, thought, tool_result,
// approval_required, usage, end and error out). Plain DOM, no framework; every text from the server is escaped.
"use strict";

const DATA = JSON.parse(document.getElementById("chat-data").textContent);
const $ = (id) => document.getElementById(id);
const state = { sessions: [], current: null, socket: null, opening: null, running: false, answer: null, turns: {} };

// ----- small helpers -----

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function cookie(name) {
  const found = document.cookie.split("; ").find((part) => part.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

async function api(method, path, body) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  if (method !== "GET") options.headers["X-CSRFToken"] = cookie("csrftoken");
  const response = await fetch(path, options);
  if (response.status === 204) return null;
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(readable(payload, `The server answered ${response.status}.`));
  return payload;
}

// A REST or WebSocket error as a sentence: {detail}, {message, fields} or {field: [messages]}.
function readable(payload, fallback) {
  if (!payload || typeof payload !== "object") return fallback;
  const parts = [];
  if (typeof payload.message === "string") parts.push(payload.message);
  if (typeof payload.detail === "string") parts.push(payload.detail);
  const fields = payload.fields || (parts.length ? null : payload);
  if (fields && typeof fields === "object") {
    for (const [name, problems] of Object.entries(fields)) {
      parts.push(`${name}: ${[].concat(problems).map(String).join(" ")}`);
    }
  }
  return parts.join(" ") || fallback;
}

function pretty(value) {
  if (typeof value === "string") return value;
  try { return JSON.stringify(value, null, 2); } catch (e) { return String(value); }
}

// ----- Markdown: the text is escaped first; only the markup built here is HTML -----

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
    "'": "&#39;" })[c]);
}

function inline(text) {
  // `text` is escaped already. Code spans first, so that nothing inside them is formatted.
  return text.split(/(`[^`\n]+`)/g).map((part) => {
    if (/^`[^`\n]+`$/.test(part)) return `<code>${part.slice(1, -1)}</code>`;
    return part
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[\s(])\*([^*\n]+)\*(?=[\s).,!?:;]|$)/g, "$1<em>$2</em>")
      .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()"]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  }).join("");
}

function markdown(source) {
  const html = [];
  const blocks = String(source).split(/^```[^\n]*\n?/m);
  // Even pieces are prose, odd ones fenced code (an unclosed fence while streaming stays code).
  blocks.forEach((block, index) => {
    if (index % 2 === 1) {
      html.push(`<pre><code>${escapeHtml(block.replace(/\n$/, ""))}</code></pre>`);
      return;
    }
    let list = null;
    const closeList = () => { if (list) { html.push(`</${list}>`); list = null; } };
    let paragraph = [];
    const flush = () => {
      if (paragraph.length) html.push(`<p>${paragraph.map((line) => inline(escapeHtml(line))).join("<br>")}</p>`);
      paragraph = [];
    };
    for (const line of block.split("\n")) {
      const heading = /^(#{1,4})\s+(.*)$/.exec(line);
      const item = /^\s*(?:([-*+])|(\d+)[.)])\s+(.*)$/.exec(line);
      if (!line.trim()) { flush(); closeList(); continue; }
      if (heading) {
        flush(); closeList();
        const level = heading[1].length + 2;
        html.push(`<h${level}>${inline(escapeHtml(heading[2]))}</h${level}>`);
      } else if (item) {
        flush();
        const kind = item[1] ? "ul" : "ol";
        if (list !== kind) { closeList(); html.push(`<${kind}>`); list = kind; }
        html.push(`<li>${inline(escapeHtml(item[3]))}</li>`);
      } else {
        closeList();
        paragraph.push(line);
      }
    }
    flush(); closeList();
  });
  return html.join("");
}

// ----- pickers -----

function configById(id) { return DATA.configs.find((config) => config.id === id) || null; }
function appById(id) { return DATA.apps.find((app) => app.id === id) || null; }

function fillPickers() {
  for (const app of DATA.apps) {
    const option = el("option", null, app.name);
    option.value = app.id;
    $("app").append(option);
  }
  const automatic = el("option", null, "App default");
  automatic.value = "";
  $("model").append(automatic);
  const models = el("optgroup");
  models.label = "Models";
  for (const config of DATA.configs) {
    const option = el("option", null, `${config.name} (${config.model_name})`);
    option.value = config.id;
    models.append(option);
  }
  if (DATA.configs.length) $("model").append(models);
  // Pools: the configs sharing a route; a turn sent to a pool fails over between them.
  if (DATA.routes.length) {
    const pools = el("optgroup");
    pools.label = "Pools (failover)";
    for (const route of DATA.routes) {
      const count = route.members.length;
      const option = el("option", null, `${route.name} (${count} model${count > 1 ? "s" : ""})`);
      option.value = `route:${route.name}`;
      pools.append(option);
    }
    $("model").append(pools);
  }
  if (!DATA.configs.length) automatic.textContent = "No model is configured yet";
  applyRanges();
}

function pickedRoute() {
  const value = $("model").value;
  return value.startsWith("route:") ? value.slice("route:".length) : null;
}

// The model a turn will use first: the picked config (or the pool's first member), else the app's, else the default.
function effectiveConfig() {
  const app = appById($("app").value);
  const route = DATA.routes.find((candidate) => candidate.name === pickedRoute());
  if (route) return configById(route.members[0]);
  return configById($("model").value) || (app && configById(app.llm_config_id))
    || DATA.configs.find((config) => config.is_default) || null;
}

// Only the models the picked app may use (its allow-list; empty: every model) can be picked; the rest are hidden.
function allowModels() {
  const app = appById($("app").value);
  const allowed = app && (app.allowed_routes || []).length ? new Set(app.allowed_routes) : null;
  for (const option of $("model").querySelectorAll("option")) {
    if (!option.value) continue;
    const route = option.value.startsWith("route:") ? option.value.slice("route:".length)
      : (configById(option.value) || {}).route_name;
    option.hidden = option.disabled = Boolean(allowed) && !allowed.has(route);
  }
  if ($("model").selectedOptions[0]?.disabled) $("model").value = "";
}

function applyRanges() {
  allowModels();
  const config = effectiveConfig();
  const provider = config ? DATA.providers[config.provider] : null;
  for (const name of ["temperature", "top_p"]) {
    const input = $(name);
    const range = provider ? provider[name] : null;
    input.min = range ? String(range.low) : "0";
    input.max = range ? String(range.high) : name === "top_p" ? "1" : "2";
    input.placeholder = config && config[name] !== null ? String(config[name]) : "default";
  }
  $("max_tokens").max = String(DATA.max_tokens_limit);
  $("max_tokens").placeholder = config && config.max_tokens ? String(config.max_tokens) : "default";
  $("param-hint").textContent = provider
    ? `${provider.label}: temperature ${provider.temperature.text}, top_p ${provider.top_p.text}. Empty: the model's own.`
    : "Empty fields use the model's own settings.";
}

// Parameters the user set, checked against the provider's ranges; throws a readable error.
function parameters() {
  const config = effectiveConfig();
  const provider = config ? DATA.providers[config.provider] : null;
  const result = {};
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    const raw = $(name).value.trim();
    if (!raw) continue;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`${name} must be a number.`);
    const range = provider && provider[name];
    if (range) {
      const above = range.low_open ? value > range.low : value >= range.low;
      const below = range.high_open ? value < range.high : value <= range.high;
      if (!above || !below) throw new Error(`${provider.label} accepts ${name} in ${range.text}, got ${raw}.`);
    }
    if (name === "max_tokens" && (!Number.isInteger(value) || value < 1 || value > DATA.max_tokens_limit)) {
      throw new Error(`max_tokens must be a whole number between 1 and ${DATA.max_tokens_limit}.`);
    }
    result[name] = value;
  }
  return result;
}

// ----- conversations -----

async function loadSessions() {
  const page = await api("GET", "/api/sessions/?page_size=200");
  state.sessions = page.results || [];
  renderSessions();
}

function renderSessions() {
  const list = $("conversations");
  list.replaceChildren();
  for (const session of state.sessions) {
    const item = el("li", session.id === (state.current && state.current.id) ? "active" : "");
    const open = el("button", "conversation", session.name || "New chat");
    open.type = "button";
    open.title = session.name || "New chat";
    open.addEventListener("click", () => selectSession(session.id));
    const rename = el("button", "icon", "✎");
    rename.type = "button";
    rename.title = "Rename";
    rename.setAttribute("aria-label", "Rename");
    rename.addEventListener("click", () => renameSession(session));
    const remove = el("button", "icon", "×");
    remove.type = "button";
    remove.title = "Delete";
    remove.setAttribute("aria-label", "Delete");
    remove.addEventListener("click", () => deleteSession(session));
    item.append(open, rename, remove);
    list.append(item);
  }
}

async function renameSession(session) {
  const name = window.prompt("Name of this conversation", session.name || "");
  if (name === null) return;
  try {
    Object.assign(session, await api("PATCH", `/api/sessions/${session.id}/`, { name: name.trim() }));
    renderSessions();
  } catch (error) { showError(error.message); }
}

async function deleteSession(session) {
  if (!window.confirm(`Delete "${session.name || "New chat"}"?`)) return;
  try {
    await api("DELETE", `/api/sessions/${session.id}/`);
    rememberPool(session.id, null);
    state.sessions = state.sessions.filter((other) => other.id !== session.id);
    if (state.current && state.current.id === session.id) newChat();
    renderSessions();
  } catch (error) { showError(error.message); }
}

function newChat() {
  closeSocket();
  state.current = null;
  state.turns = {};
  history.replaceState(null, "", location.pathname);
  renderSessions();
  const app = appById($("app").value);
  $("messages").replaceChildren();
  if (app && (app.opening_statement || (app.suggested_questions || []).length)) {
    const opening = el("div", "opening", app.opening_statement || "");
    const questions = el("div", "suggestions");
    for (const question of app.suggested_questions || []) {
      if (typeof question !== "string" || !question.trim()) continue;
      const button = el("button", "suggestion", question);
      button.type = "button";
      button.addEventListener("click", () => { $("input").value = question; $("composer").requestSubmit(); });
      questions.append(button);
    }
    opening.append(questions);
    $("messages").append(opening);
  }
  $("app").disabled = false;
  $("input").focus();
}

async function selectSession(id) {
  const session = state.sessions.find((candidate) => candidate.id === id);
  if (!session) return newChat();
  performance.mark("chat-history-start");
  closeSocket();
  state.current = session;
  state.turns = {};
  history.replaceState(null, "", `#${id}`);
  renderSessions();
  $("app").value = session.app_id;
  $("app").disabled = true;  // a conversation stays with its app
  $("model").value = configById(session.llm_config_id) ? session.llm_config_id : "";  // a removed model: the default
  const pool = rememberedPool(id);
  if (pool && DATA.routes.some((route) => route.name === pool)) $("model").value = `route:${pool}`;
  const saved = session.model_parameters || {};
  for (const name of ["temperature", "top_p", "max_tokens"]) $(name).value = saved[name] ?? "";
  applyRanges();
  $("messages").replaceChildren(el("p", "loading", "Loading…"));
  try {
    const [messages, approvals] = await Promise.all([
      allMessages(id), api("GET", "/api/approvals/?status=pending&page_size=1000")]);
    if (!state.current || state.current.id !== id) return;
    renderHistory(messages, (approvals.results || []).filter((approval) => approval.session_id === id));
  } catch (error) {
    $("messages").replaceChildren();
    showError(error.message);
  }
  state.opening = openSocket(id).catch((error) => showError(error.message));
}

async function allMessages(id) {
  const messages = [];
  let path = `/api/sessions/${id}/messages/?page_size=1000`;
  while (path) {
    const page = await api("GET", path);
    messages.push(...page.results);
    path = page.next ? new URL(page.next, location.href).pathname + new URL(page.next, location.href).search : null;
  }
  return messages;
}

// ----- rendering a conversation -----

function renderHistory(messages, approvals) {
  const fragment = document.createDocumentFragment();
  for (const message of messages) {
    fragment.append(el("div", "bubble user", message.query));
    const turn = newTurn(message.id);
    for (const thought of message.thoughts || []) {
      if (thought.tool) upsertStep(turn, thought.id, { tool: thought.tool, tool_input: thought.tool_input,
        observation: thought.observation, status: thought.status });
    }
    for (const approval of approvals.filter((candidate) => candidate.message_id === message.id)) {
      addApproval(turn, { approval_id: approval.id, tool: approval.tool, tool_input: approval.tool_input,
        approver: approval.approver });
    }
    setAnswer(turn, message.answer);
    turn.info = usageText(message.model_name, message.total_tokens, message.latency);
    finishTurn(turn, message.status, message.error);
    fragment.append(turn.node);
  }
  $("messages").replaceChildren(fragment);
  scrollDown();
  // Loading and drawing a conversation, for the page's speed budget (tests/e2e/test_chat_browser.py reads it).
  performance.measure("chat-history", "chat-history-start");
}

function newTurn(messageId) {
  const node = el("div", "bubble assistant");
  node.dataset.messageId = messageId || "";
  const steps = el("div", "steps");
  const answer = el("div", "answer markdown");
  const footer = el("div", "meta");
  node.append(steps, answer, footer);
  const turn = { node, steps, answer, footer, text: "", stepNodes: {} };
  if (messageId) state.turns[messageId] = turn;
  return turn;
}

function upsertStep(turn, id, thought) {
  let step = turn.stepNodes[id];
  if (!step) {
    const details = el("details", "step");
    const summary = el("summary");
    const input = el("pre", "step-input");
    const output = el("pre", "step-output");
    details.append(summary, el("div", "label", "Input"), input, el("div", "label", "Output"), output);
    step = turn.stepNodes[id] = { details, summary, input, output };
    turn.steps.append(details);
  }
  if (thought.tool) step.tool = thought.tool;
  if (thought.status) step.status = thought.status;
  step.summary.textContent = `Tool: ${step.tool || "…"}${step.status ? ` · ${step.status.replace(/_/g, " ")}` : ""}`;
  if (thought.tool_input && Object.keys(thought.tool_input).length) step.input.textContent = pretty(thought.tool_input);
  if (thought.observation) step.output.textContent = thought.observation;
  if (!step.output.textContent) step.output.textContent = thought.status === "awaiting_approval"
    ? "(waiting for approval)" : "(running…)";
  step.details.dataset.status = thought.status || "";
}

function mayDecide(approval) {
  if (DATA.command_tools.includes(approval.tool)) return DATA.may_decide.command;
  if (approval.approver === "staff") return DATA.may_decide.staff;
  return true;
}

function addApproval(turn, approval) {
  const box = el("div", "approval");
  box.dataset.approvalId = approval.approval_id;
  box.append(el("div", "approval-title", `Approval needed: ${approval.tool}`),
    el("pre", "step-input", pretty(approval.tool_input)));
  if (mayDecide(approval)) {
    const actions = el("div", "actions");
    for (const [decision, label, kind] of [["approve", "Approve", "primary"], ["reject", "Reject", "danger"]]) {
      const button = el("button", kind, label);
      button.type = "button";
      button.dataset.decision = decision;
      button.addEventListener("click", () => decide(box, approval.approval_id, decision));
      actions.append(button);
    }
    box.append(actions);
  } else {
    box.append(el("p", "waiting", "Waiting for approval by someone allowed to decide."));
  }
  turn.steps.append(box);
}

function setAnswer(turn, text) {
  turn.text = text || "";
  turn.answer.innerHTML = markdown(turn.text);
}

// "model · 1,234 tokens · 2.1 s" under an answer.
function usageText(model, tokens, latency) {
  const parts = [];
  if (model) parts.push(model);
  if (tokens) parts.push(`${Number(tokens).toLocaleString("en")} tokens`);
  if (latency) parts.push(`${Number(latency).toFixed(1)} s`);
  return parts.join(" · ");
}

function finishTurn(turn, status, error) {
  turn.node.dataset.status = status || "";
  turn.footer.replaceChildren();
  if (turn.info && status !== "running") turn.footer.append(el("span", "info", turn.info));
  if (status === "stopped") turn.footer.append(el("span", "badge", "Stopped"));
  if (status === "paused") turn.footer.append(el("span", "badge", "Paused: waiting for an approval"));
  if (status === "running") turn.footer.append(el("span", "badge", "Still running…"));
  if (error) turn.footer.append(el("div", "error", error));
}

function showError(text) {
  $("messages").append(el("div", "error", text));
  scrollDown();
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

// A new conversation's name until it is renamed: its first message, shortened as Dify names conversations.
function shortName(text) {
  const folded = text.split(/\s+/).filter(Boolean).join(" ");
  return folded.length > 47 ? `${folded.slice(0, 47)}...` : folded;
}

// ----- the WebSocket -----

function closeSocket() {
  if (state.socket) {
    state.socket.onclose = null;
    state.socket.close();
  }
  state.socket = null;
  setRunning(false);
}

function openSocket(id) {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/agent/sessions/${id}/`);
    state.socket = socket;
    socket.onopen = () => resolve(socket);
    socket.onerror = () => reject(new Error("The live connection could not be opened."));
    socket.onmessage = (event) => onEvent(JSON.parse(event.data));
    socket.onclose = (event) => {
      if (state.socket !== socket) return;
      state.socket = null;
      setRunning(false);
      const reasons = { 4401: "You are signed out: reload the page to sign in.", 4404: "This conversation is gone." };
      showError(reasons[event.code] || "The live connection closed; it reopens when you send a message.");
    };
  });
}

async function socketFor(id) {
  if (state.socket && state.socket.readyState === WebSocket.CONNECTING) await state.opening;
  if (state.socket && state.socket.readyState === WebSocket.OPEN) return state.socket;
  closeSocket();
  return openSocket(id);
}

function setRunning(running) {
  state.running = running;
  $("send").disabled = running;
  $("stop").hidden = !running;
}

let renderPending = false;

function onEvent(event) {
  let turn = state.answer;
  if (event.type === "run_started") {
    if (!turn || (turn.node.dataset.messageId && turn.node.dataset.messageId !== event.message_id)) {
      turn = state.answer = newTurn(event.message_id);
      $("messages").append(turn.node);
    }
    turn.node.dataset.messageId = event.message_id;
    state.turns[event.message_id] = turn;
    turn.text = "";
    turn.error = null;
    turn.model = event.model_name;
    finishTurn(turn, "running");
    setRunning(true);
  } else if (event.type === "delta" && turn) {
    turn.text += event.delta;
    if (!renderPending) {  // at most one Markdown rendering per frame
      renderPending = true;
      requestAnimationFrame(() => { renderPending = false; setAnswer(turn, turn.text); scrollDown(); });
    }
  } else if ((event.type === "thought" || event.type === "tool_result") && turn && event.tool) {
    upsertStep(turn, event.thought_id, event);
  } else if (event.type === "approval_required" && turn) {
    addApproval(turn, event);
  } else if (event.type === "usage" && turn) {
    turn.info = usageText(turn.model, event.total_tokens, event.latency);
  } else if (event.type === "end") {
    if (turn) {
      setAnswer(turn, event.answer || turn.text);
      finishTurn(turn, event.status, turn.error);
    }
    state.answer = null;
    setRunning(false);
    loadSessions().catch(() => {});  // a new name or order
  } else if (event.type === "error") {
    const text = readable(event, "Something went wrong.");
    if (turn && event.category) {
      turn.error = text;
      finishTurn(turn, "error", text);
    } else {
      showError(text);
      if (turn && !turn.node.dataset.messageId && !["run_in_progress", "not_running"].includes(event.code)) {
        turn.node.remove();  // the turn never started
        state.answer = null;
        setRunning(false);
      }
    }
  }
  scrollDown();
}

// A conversation stores a config, not a pool: the pool picked for it is remembered in this browser.
function rememberPool(sessionId, route) {
  try {
    if (route) localStorage.setItem(`opsagent.pool.${sessionId}`, route);
    else localStorage.removeItem(`opsagent.pool.${sessionId}`);
  } catch { /* storage disabled: the picker falls back to the conversation's config */ }
}

function rememberedPool(sessionId) {
  try { return localStorage.getItem(`opsagent.pool.${sessionId}`); } catch { return null; }
}

async function send(text, params) {
  const body = { type: "chat", message: text, ...params };
  const route = pickedRoute();
  const configId = route ? null : $("model").value || null;
  if (route) body.model = route;
  else if (configId) body.model_config_id = configId;
  try {
    if (!state.current) {
      const session = await api("POST", "/api/sessions/", { app_id: $("app").value || null, name: shortName(text),
        llm_config_id: configId, model_parameters: params });
      state.sessions.unshift(session);
      rememberPool(session.id, route);
      await selectSession(session.id);
    } else {
      rememberPool(state.current.id, route);
      api("PATCH", `/api/sessions/${state.current.id}/`, { llm_config_id: configId, model_parameters: params }).then((saved) => Object.assign(state.current, saved)).catch(() => {});
    }
    const socket = await socketFor(state.current.id);
    $("messages").querySelector(".opening")?.remove();
    $("messages").append(el("div", "bubble user", text));
    state.answer = newTurn("");
    finishTurn(state.answer, "running");
    $("messages").append(state.answer.node);
    setRunning(true);
    scrollDown();
    socket.send(JSON.stringify(body));
  } catch (error) {
    showError(error.message);
  }
}

function decide(box, approvalId, decision) {
  if (!state.socket || state.socket.readyState !== WebSocket.OPEN) {
    showError("The live connection is closed: reload the page and decide again.");
    return;
  }
  for (const button of box.querySelectorAll("button")) button.disabled = true;
  box.append(el("p", "waiting", decision === "approve" ? "Approved." : "Rejected."));
  // The decision resumes the paused turn: its events come as a new run of the same message.
  state.answer = state.turns[box.closest(".bubble").dataset.messageId] || null;
  setRunning(true);
  state.socket.send(JSON.stringify({ type: "approval", id: approvalId, decision }));
}

// ----- wiring -----

function start() {
  fillPickers();
  $("app").addEventListener("change", () => { applyRanges(); if (!state.current) newChat(); });
  $("model").addEventListener("change", applyRanges);
  $("new-chat").addEventListener("click", newChat);
  $("toggle-sidebar").addEventListener("click", () => {
    const open = $("sidebar").classList.toggle("open");
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.running) return;
    let params;
    try { params = parameters(); } catch (error) { showError(error.message); return; }
    $("input").value = "";
    send(text, params);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(JSON.stringify({ type: "stop" }));
  });
  const wanted = location.hash.slice(1);
  // A question sent before the list arrives has opened its own conversation by then: keep it.
  loadSessions()
    .then(() => {
      if (state.current) return null;
      return wanted && state.sessions.some((s) => s.id === wanted) ? selectSession(wanted) : newChat();
    })
    .catch((error) => showError(error.message));
  if (!DATA.apps.length) showError("No agent app exists yet: create one in the admin (Agent apps).");
}

start();
