// The live view, as in Apple's FastVLM app: the camera, a prompt, and a running caption over the video with its
// time to first token. One request in flight: when an answer ends, the newest frame goes next (taken at send time,
// so frames from meanwhile are never queued). Each answer is also announced as an "answer" event on the section,
// with its timings, for anyone measuring the page.
import { request, streamChat } from "./api.js";
import { showStatus } from "./app.js";

const PRESETS = ["Describe what you see in one sentence.", "What text is visible?", "Count the people."];
const OWN = "own";
const DEFAULT_SIZE = 1024; // the published FastVLM checkpoints' resolution, if the server does not say
const MAX_TOKENS = 48; // a caption, not an essay: short answers keep the caption current
const JPEG_QUALITY = 0.85;

let section = null;
let model = null;
let size = DEFAULT_SIZE;
let ui = {};
let camera = null; // the MediaStream while the camera is on
let wanted = false; // the user started the live mode (and has not stopped it)
let shown = false; // the view is on screen
let looping = false; // the one answer loop is running
let inFlight = null; // the AbortController of the request in flight
let starting = null; // the camera's start, while it is under way

function element(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

export function init(view, modelId) {
  section = view;
  model = modelId;
  ui.video = element("video", { muted: "", playsinline: "", autoplay: "", "aria-label": "Camera preview" });
  ui.video.muted = true;
  ui.ttft = element("p", { class: "live-ttft", "aria-label": "Time to first token" });
  ui.state = element("p", { class: "live-state" }, "Idle");
  ui.caption = element("p", { class: "live-caption", id: "live-caption", "aria-label": "Caption" });
  const stage = element("div", { class: "live-stage" }, ui.video, ui.ttft, ui.state, ui.caption);

  ui.start = element("button", { type: "button", class: "live-start", "aria-pressed": "false" }, "Start camera");
  ui.camera = element("select", { id: "live-camera" });
  ui.camera.append(
    element("option", { value: "facing:user" }, "Front camera"),
    element("option", { value: "facing:environment" }, "Back camera"),
  );
  ui.prompt = element("select", { id: "live-prompt" });
  for (const text of PRESETS) ui.prompt.append(element("option", { value: text }, text));
  ui.prompt.append(element("option", { value: OWN }, "Your own prompt…"));
  ui.own = element("input", { id: "live-own", type: "text", placeholder: "Ask about what the camera sees" });
  ui.ownLabel = element("label", { for: "live-own" }, "Your prompt");
  ui.ownRow = element("div", { class: "live-row" }, ui.ownLabel, ui.own);
  ui.ownRow.hidden = true;
  const controls = element(
    "div",
    { class: "live-controls" },
    ui.start,
    element("div", { class: "live-row" }, element("label", { for: "live-camera" }, "Camera"), ui.camera),
    element("div", { class: "live-row" }, element("label", { for: "live-prompt" }, "Prompt"), ui.prompt),
    ui.ownRow,
  );
  section.append(stage, controls);

  ui.start.addEventListener("click", () => (wanted ? stop() : start()));
  ui.camera.addEventListener("change", () => {
    if (wanted) restartCamera();
  });
  ui.prompt.addEventListener("change", () => {
    ui.ownRow.hidden = ui.prompt.value !== OWN;
    if (!ui.ownRow.hidden) ui.own.focus();
  });
  document.addEventListener("visibilitychange", () => (document.hidden ? pause() : resume()));
  request("/v1/models")
    .then((models) => {
      const entry = models.data.find((m) => m.id === model) || models.data[0];
      if (Number.isInteger(entry?.image_size) && entry.image_size > 0) size = entry.image_size;
    })
    .catch(() => {}); // the default size serves; a real problem shows on the first answer
}

export function show() {
  shown = true;
  resume();
}

export function hide() {
  shown = false;
  pause();
  stopCamera(); // leaving the view turns the camera off; coming back turns it on again if it was started
}

function prompt() {
  const text = ui.prompt.value === OWN ? ui.own.value.trim() : ui.prompt.value;
  return text || PRESETS[0];
}

function setState(text) {
  ui.state.textContent = text;
  ui.state.dataset.state = text.toLowerCase().replace(/ /g, "-");
}

async function start() {
  wanted = true;
  ui.start.textContent = "Stop camera";
  ui.start.setAttribute("aria-pressed", "true");
  resume();
}

function stop() {
  wanted = false;
  ui.start.textContent = "Start camera";
  ui.start.setAttribute("aria-pressed", "false");
  pause();
  stopCamera();
  setState("Idle");
}

/** Everything stops; the error is said once. */
function fail(message) {
  stop();
  showStatus(`Error: ${message}`);
}

function active() {
  return wanted && shown && !document.hidden;
}

function pause() {
  inFlight?.abort();
  if (wanted) setState("Paused");
}

async function resume() {
  if (!active()) return;
  try {
    if (!camera) await (starting ||= startCamera().finally(() => (starting = null)));
  } catch (e) {
    fail(cameraError(e));
    return;
  }
  if (active()) kick();
}

function cameraError(e) {
  if (!navigator.mediaDevices?.getUserMedia) return "this page needs https (or localhost) to use the camera";
  if (e.name === "NotAllowedError") return "the camera permission was denied";
  if (e.name === "NotFoundError" || e.name === "OverconstrainedError") return "no such camera";
  return `the camera could not start (${e.message || e.name})`;
}

function constraints() {
  const [kind, value] = ui.camera.value.split(/:(.*)/s);
  const video = { width: { ideal: 1280 }, height: { ideal: 720 } };
  if (kind === "device") video.deviceId = { exact: value };
  else video.facingMode = value;
  return { video, audio: false };
}

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) throw new Error("no camera API");
  const stream = await navigator.mediaDevices.getUserMedia(constraints());
  if (!wanted || !shown) {
    for (const track of stream.getTracks()) track.stop(); // stopped or left while the permission was asked
    return;
  }
  camera = stream;
  for (const track of stream.getVideoTracks()) {
    track.addEventListener("ended", () => camera === stream && fail("the camera stopped (unplugged or taken away)"));
  }
  ui.video.srcObject = camera;
  await ui.video.play().catch(() => {}); // autoplay serves where play() is refused
  listCameras();
}

function stopCamera() {
  if (!camera) return;
  for (const track of camera.getTracks()) track.stop();
  camera = null;
  ui.video.srcObject = null;
}

async function restartCamera() {
  pause();
  stopCamera();
  resume();
}

/** Once the permission is given, the devices have labels: list them after the front and back choices. */
async function listCameras() {
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  const known = new Set([...ui.camera.options].map((o) => o.value));
  devices.forEach((device, i) => {
    const value = `device:${device.deviceId}`;
    if (device.deviceId && !known.has(value)) {
      ui.camera.append(element("option", { value }, device.label || `Camera ${i + 1}`));
    }
  });
}

/** Resolves once the video shows a frame it did not show before (or after a short wait). */
function nextFrame() {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, 500);
    if (ui.video.requestVideoFrameCallback) {
      ui.video.requestVideoFrameCallback(() => {
        clearTimeout(timer);
        resolve();
      });
    }
  });
}

/** The frame on screen now, scaled to fit the model's resolution (never up: the server pads and resizes). */
function capture() {
  const { videoWidth: w, videoHeight: h } = ui.video;
  if (!w || !h) return null;
  const scale = Math.min(1, size / Math.max(w, h));
  const canvas = document.createElement("canvas");
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  canvas.getContext("2d").drawImage(ui.video, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", JPEG_QUALITY);
}

/** The one loop: answer, then the newest frame, until paused or stopped. */
function kick() {
  if (looping) return;
  looping = true;
  loop().finally(() => {
    looping = false;
    if (active() && camera) kick(); // resumed while the last request was still winding down
  });
}

async function loop() {
  while (active() && camera) {
    await nextFrame();
    if (!active() || !camera) return;
    const controller = new AbortController();
    inFlight = controller;
    try {
      await answer(controller.signal);
    } catch (e) {
      if (controller.signal.aborted) return; // paused or stopped
      fail(e.message || String(e));
      return;
    } finally {
      inFlight = null;
    }
  }
}

async function answer(signal) {
  const capturedAt = performance.now();
  const url = capture();
  if (!url) return;
  const encodedAt = performance.now();
  setState("Processing prompt");
  const body = {
    model,
    max_tokens: MAX_TOKENS,
    temperature: 0,
    messages: [{ role: "user", content: [{ type: "image_url", image_url: { url } }, { type: "text", text: prompt() }] }],
  };
  let text = "";
  let firstAt = null;
  let timings = null;
  for await (const chunk of streamChat(body, signal)) {
    const delta = chunk.choices?.[0]?.delta?.content;
    if (delta) {
      text += delta;
      ui.caption.textContent = text; // the last caption stays up until this one's first token replaces it
      if (firstAt === null) {
        firstAt = performance.now();
        ui.ttft.textContent = `TTFT ${Math.round(firstAt - capturedAt)} ms`;
        setState("Generating");
      }
    }
    if (chunk.timings) timings = chunk.timings;
  }
  const endedAt = performance.now();
  if (firstAt === null) ui.caption.textContent = "";
  setState(active() ? "Processing prompt" : "Paused");
  section.dispatchEvent(
    new CustomEvent("answer", {
      detail: {
        captured_at: performance.timeOrigin + capturedAt, // ms since the epoch, to compare with other clocks
        capture_ms: encodedAt - capturedAt,
        ttft_ms: firstAt === null ? null : firstAt - capturedAt,
        total_ms: endedAt - capturedAt,
        server_ttft_ms: timings?.ttft_ms ?? null,
        server_vision_ms: timings?.vision_ms ?? null,
        server_prompt_ms: timings?.prompt_ms ?? null,
        image_bytes: url.length,
        text,
      },
    }),
  );
}
