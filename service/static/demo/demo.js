"use strict";
// The demo page: a client of the public /v1 API and of nothing else. The drawing goes to the
// service as a PNG; what the model saw comes back from POST /v1/preprocess (the service's one
// preprocessing function), and this page only paints those values.

const API = new URL("../v1/", document.baseURI); // the page is at <root>/demo/
const KEY_STORE = "ntm-demo-api-key";
const STROKE = 0.04; // line width as a share of the pad's side: about Omniglot's strokes once at 28x28

const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  session: null, // {session_id, model, num_ways, expires_at}
  labels: [], // the session's slot table: each slot's label, null while free
  retry: null, // the action to run again once an API key is given
  inked: false,
  groups: new Map(), // label -> the gallery's element for it
};

// ------------------------------------------------------------------------------ the API

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  let response;
  try {
    response = await fetch(new URL(path, API), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, "unreachable", String(err.message || err));
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status,
      error.code || `http_${response.status}`,
      error.message || text.slice(0, 300) || response.statusText,
      response.headers.get("Retry-After"),
    );
  }
  return data;
}

const sessionPath = (suffix) => `sessions/${encodeURIComponent(state.session.session_id)}${suffix}`;

// ------------------------------------------------------------------------------ errors in words

const WORDS = {
  unauthorized: "This server needs a valid API key.",
  session_not_found:
    "This session is gone: it expired after being idle, or the server forgot it (a restart). Start a new session to go on.",
  model_not_found: "The server does not serve that model.",
  too_many_labels:
    "Every slot of this session already has a label, so it cannot learn another: reset the session to teach other labels.",
  session_step_limit: "This session has taken all the steps it may: reset it.",
  too_many_sessions: "This API key holds as many sessions as it may: wait for some to expire, then try again.",
  store_full: "The server holds as many sessions as it can: try again later.",
  unavailable: "The server is busy, starting or shutting down: try again shortly.",
  step_conflict: "The session moved on meanwhile (another tab or client?): try again.",
  state_incompatible: "This session was made by other model weights than the server now serves: start a new session.",
  invalid_image: "The server refused the drawing as an image.",
  invalid_request: "The server refused the request as malformed.",
  payload_too_large: "The drawing is too large to send.",
  unreachable: "The server could not be reached: is it running, and is the network up?",
};

function byStatus(status) {
  if (status === 401) return WORDS.unauthorized;
  if (status === 404) return "The server does not know what was asked for.";
  if (status === 409) return "The request conflicts with the session's state: try again.";
  if (status === 413) return WORDS.payload_too_large;
  if (status === 422) return "The server refused the request.";
  if (status === 429) return "Too many requests or sessions for now: wait, then try again.";
  if (status >= 500) return `The server failed to answer (status ${status}): try again.`;
  return `The server answered with status ${status}.`;
}

function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong in this page: ${error}`;
  const words = WORDS[error.code] || byStatus(error.status);
  const status = error.status ? `${error.status} ` : "";
  const wait = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : "";
  return `${words}${wait} (${status}${error.code}: ${error.message})`;
}

function showError(error, action) {
  $("error-text").textContent = describe(error);
  $("new-session").hidden = !["session_not_found", "state_incompatible"].includes(error.code);
  $("error").hidden = false;
  if (error.status === 401) {
    state.retry = action;
    $("key-reason").textContent = state.key
      ? "The server refused this API key: enter another."
      : "This server needs an API key: enter yours to go on.";
    $("key-panel").hidden = false;
    $("api-key").focus();
  }
}

function hideError() {
  $("error").hidden = true;
}

function say(text) {
  $("status").textContent = text;
}

// One action at a time: buttons off while it runs, every failure shown in words.
async function run(action) {
  hideError();
  for (const id of ["teach", "ask", "reset"]) $(id).disabled = true;
  try {
    await action();
  } catch (error) {
    say("");
    showError(error, action);
  } finally {
    for (const id of ["teach", "ask", "reset"]) $(id).disabled = false;
  }
}

// ------------------------------------------------------------------------------ the pad

const pad = $("pad");
const pen = pad.getContext("2d");

function clearPad() {
  pen.fillStyle = "#fff";
  pen.fillRect(0, 0, pad.width, pad.height);
  state.inked = false;
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left - pad.clientLeft) * pad.width) / pad.clientWidth,
    y: ((event.clientY - box.top - pad.clientTop) * pad.height) / pad.clientHeight,
  };
}

function stroke(from, to) {
  pen.strokeStyle = "#000";
  pen.lineWidth = STROKE * pad.width;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.beginPath();
  pen.moveTo(from.x, from.y);
  pen.lineTo(to.x, to.y);
  pen.stroke();
  state.inked = true;
}

let drawing = null; // {pointer, last} while a stroke is under way

pad.addEventListener("pointerdown", (event) => {
  if (drawing) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  const point = padPoint(event);
  drawing = { pointer: event.pointerId, last: point };
  stroke(point, point);
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing || event.pointerId !== drawing.pointer) return;
  const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const each of coalesced.length ? coalesced : [event]) {
    const point = padPoint(each);
    stroke(drawing.last, point);
    drawing.last = point;
  }
});

for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, (event) => {
    if (drawing && event.pointerId === drawing.pointer) drawing = null;
  });
}

const padPng = () => pad.toDataURL("image/png").split(",", 2)[1];

// ------------------------------------------------------------------------------ what the model saw

async function modelInput(png) {
  const body = { image: { png } };
  if (state.session) body.model = state.session.model;
  return (await api("POST", "preprocess", body)).ink;
}

// Paints the model's input as it is, one pixel per value: ink 1 is black, 0 white.
function paintInk(canvas, ink) {
  const size = ink.length;
  canvas.width = size;
  canvas.height = size;
  const context = canvas.getContext("2d");
  const image = context.createImageData(size, size);
  ink.forEach((row, y) =>
    row.forEach((value, x) => {
      const level = Math.round(255 * (1 - value));
      image.data.set([level, level, level, 255], 4 * (y * size + x));
    }),
  );
  context.putImageData(image, 0, 0);
}

function addThumbnail(label, ink) {
  let group = state.groups.get(label);
  if (!group) {
    group = document.createElement("div");
    group.className = "group";
    group.dataset.label = label;
    const title = document.createElement("h3");
    title.textContent = label;
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    group.append(title, thumbs);
    $("gallery").append(group);
    state.groups.set(label, group);
  }
  const canvas = document.createElement("canvas");
  canvas.className = "thumb";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `a drawing of ${label}, as the model saw it`);
  paintInk(canvas, ink);
  group.querySelector(".thumbs").append(canvas);
}

// ------------------------------------------------------------------------------ answers

const percent = (p) => `${(100 * p).toFixed(1)}%`;

function showAnswer(kind, result, labels, ink) {
  $("answer-kind").textContent = kind;
  $("prediction").textContent =
    result.prediction === null
      ? "Something new: its most likely slot has no label yet"
      : `It is “${result.prediction}”`;
  $("novelty").textContent = `Novelty ${percent(result.novelty)}: the probability on slots with no label yet`;
  const bars = $("bars");
  bars.replaceChildren();
  result.probabilities.forEach((probability, slot) => {
    const item = document.createElement("li");
    if (slot === result.predicted_slot) item.className = "top";
    const name = document.createElement("span");
    name.className = labels[slot] === null ? "name free" : "name";
    name.textContent = labels[slot] === null ? `slot ${slot + 1}: free` : labels[slot];
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = percent(probability);
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = percent(probability);
    item.append(name, track, value);
    bars.append(item);
  });
  paintInk($("answer-input"), ink);
  $("answer").hidden = false;
  $("no-answer").hidden = true;
}

function forgetEpisode() {
  $("gallery").replaceChildren();
  state.groups.clear();
  $("answer").hidden = true;
  $("no-answer").hidden = false;
}

// ------------------------------------------------------------------------------ actions

async function newSession() {
  const model = $("model").value;
  state.session = await api("POST", "sessions", model ? { model } : {});
  state.labels = Array(state.session.num_ways).fill(null);
  $("session-id").textContent = `${state.session.session_id} (${state.session.model}, ${state.session.num_ways} labels)`;
  forgetEpisode();
  say(`New session: teach up to ${state.session.num_ways} labels.`);
}

async function start() {
  const { models } = await api("GET", "models");
  const select = $("model");
  select.replaceChildren(
    ...models.map((model) => {
      const option = new Option(`${model.name} (${model.num_ways} labels)`, model.name);
      option.selected = model.default;
      return option;
    }),
  );
  await newSession();
}

function drawingOrSay(what) {
  if (!state.inked) {
    say(`Draw something first, then ${what}.`);
    return null;
  }
  return padPng();
}

async function teach() {
  const label = $("label").value.trim();
  const png = drawingOrSay("teach it");
  if (png === null) return;
  if (!label) {
    say("Give the drawing a label first.");
    $("label").focus();
    return;
  }
  if (!state.session) await newSession();
  const ink = await modelInput(png);
  const before = state.labels;
  const result = await api("POST", sessionPath("/steps"), { image: { png }, label });
  state.labels = result.labels;
  showAnswer(`Before it learned “${label}”, the model answered:`, result, before, ink);
  addThumbnail(label, ink);
  clearPad();
  $("label").value = "";
  say(`Taught “${label}” (step ${result.step + 1}). Draw the next one, or one again and ask.`);
}

async function ask() {
  const png = drawingOrSay("ask");
  if (png === null) return;
  if (!state.session) await newSession();
  const ink = await modelInput(png);
  const answer = await api("POST", sessionPath("/predict"), { images: [{ png }] });
  showAnswer("The model answers:", answer.results[0], state.labels, ink);
  say("Asked: the session has not changed. Clear the pad to draw another.");
}

async function reset() {
  if (!state.session) return newSession();
  const info = await api("POST", sessionPath("/reset"));
  state.labels = info.labels;
  forgetEpisode();
  say("Session reset: a fresh episode, nothing taught.");
}

$("teach").addEventListener("click", () => run(teach));
$("ask").addEventListener("click", () => run(ask));
$("clear").addEventListener("click", clearPad);
$("reset").addEventListener("click", () => run(reset));
$("new-session").addEventListener("click", () => run(newSession));
$("model").addEventListener("change", () => run(newSession));
$("label").addEventListener("keydown", (event) => {
  if (event.key === "Enter") run(teach);
});
$("key-panel").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, state.key);
  $("key-panel").hidden = true;
  const action = state.retry || start;
  state.retry = null;
  run(action);
});

clearPad();
run(start);
