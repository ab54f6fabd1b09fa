// The chat view: a conversation with images, streamed answers, stop, edit and retry, the settings, and each
// answer's timings. Text goes into the page only through textContent: nothing typed or generated becomes HTML.
import { streamChat } from "./api.js";

const MAX_SIDE = 1024; // longest side an image is sent at; larger ones are scaled down here, in the browser
const MAX_RAW_BYTES = 1 << 20; // a small image within MAX_SIDE goes as its own bytes, untouched
const RAW_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];

let model = null;
let ui = {}; // the view's elements, by role
let turns = []; // {role: "user", text, images: [{url, name}]}, {role: "assistant", text, ...}, {role: "error", text}
let pending = []; // the images chosen for the next message
let editing = null; // the user turn being edited (the composer holds its text and images), or null
let controller = null; // the answer being streamed, to stop it
const nodes = new WeakMap(); // turn -> its list item, so that a render keeps the nodes it can

export function init(section, modelId) {
  model = modelId;
  section.append(document.getElementById("chat-template").content.cloneNode(true));
  const find = (selector) => section.querySelector(selector);
  ui = {
    list: find(".conversation"), form: find(".composer"), input: find("#chat-input"), files: find("#chat-files"),
    attachments: find(".attachments"), stop: find(".stop"), send: find(".send"), clear: find(".clear"),
    editing: find(".editing"), cancelEdit: find(".cancel-edit"), settings: find(".settings"),
    system: find("#chat-system"), temperature: find("#chat-temperature"), maxTokens: find("#chat-max-tokens"),
    schema: find("#chat-schema"), schemaError: find("#chat-schema-error"),
  };
  ui.form.addEventListener("submit", (event) => { event.preventDefault(); send(); });
  ui.input.addEventListener("keydown", onKey);
  ui.files.addEventListener("change", () => { addImages(ui.files.files); ui.files.value = ""; });
  ui.stop.addEventListener("click", stop);
  ui.clear.addEventListener("click", clear);
  ui.cancelEdit.addEventListener("click", cancelEdit);
  ui.schema.addEventListener("input", () => showSchemaError(""));
  section.addEventListener("paste", onPaste);
  section.addEventListener("dragover", onDragOver);
  section.addEventListener("dragleave", () => section.classList.remove("dropping"));
  section.addEventListener("drop", (event) => onDrop(event, section));
  section.addEventListener("keydown", (event) => { if (event.key === "Escape" && controller) stop(); });
}

export function show() {
  ui.input?.focus();
}

export function hide() {}

// ------------------------------------------------------------------------------------------- input
function onKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
}

function onPaste(event) {
  const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
  if (!files.length) return; // plain text is pasted as usual
  event.preventDefault();
  addImages(files);
}

function onDragOver(event) {
  if (![...event.dataTransfer.types].includes("Files")) return;
  event.preventDefault();
  event.currentTarget.classList.add("dropping");
}

function onDrop(event, section) {
  section.classList.remove("dropping");
  if (!event.dataTransfer.files.length) return;
  event.preventDefault();
  addImages(event.dataTransfer.files);
}

async function addImages(files) {
  for (const file of [...files]) {
    try {
      pending.push({ url: await imageURL(file), name: file.name || "pasted image" });
    } catch (e) {
      addError(e.message);
    }
  }
  renderAttachments();
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

/** The image as a data URL: its own bytes when small enough, else scaled to MAX_SIDE (PNG stays PNG, for its
 * transparency and sharp edges; anything else becomes JPEG). One the browser cannot decode (HEIC, say) goes as
 * it is, for the server to decode, when it is small. */
async function imageURL(file) {
  if (file.type && !file.type.startsWith("image/")) throw new Error(`${file.name} is not an image`);
  let bitmap = null;
  try {
    bitmap = await createImageBitmap(file);
  } catch (_) {
    if (file.size <= MAX_RAW_BYTES) return readDataURL(file);
    throw new Error(`cannot decode ${file.name} as an image`);
  }
  const scale = Math.min(1, MAX_SIDE / Math.max(bitmap.width, bitmap.height));
  if (scale === 1 && file.size <= MAX_RAW_BYTES && RAW_TYPES.includes(file.type)) {
    bitmap.close();
    return readDataURL(file);
  }
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  return file.type === "image/png" ? canvas.toDataURL("image/png") : canvas.toDataURL("image/jpeg", 0.9);
}

// ----------------------------------------------------------------------------------------- sending
/** The request's response_format from the schema box: null when empty, undefined (and an inline error) when
 * the text is not a JSON object. */
function responseFormat() {
  const text = ui.schema.value.trim();
  if (!text) return null;
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (e) {
    return showSchemaError(`The JSON schema is not valid JSON: ${e.message}`);
  }
  if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
    return showSchemaError("The JSON schema must be a JSON object.");
  }
  return { type: "json_schema", json_schema: { name: "page", schema } };
}

function showSchemaError(message) {
  ui.schemaError.textContent = message;
  ui.schema.setAttribute("aria-invalid", String(Boolean(message)));
  if (message) {
    ui.settings.open = true;
    ui.schema.focus();
  }
  return undefined;
}

function send() {
  if (controller) return;
  const text = ui.input.value.trim();
  if (!text && !pending.length) return;
  const format = responseFormat();
  if (format === undefined) return;
  if (editing !== null) turns = turns.slice(0, turns.indexOf(editing));
  turns.push({ role: "user", text, images: pending });
  pending = [];
  ui.input.value = "";
  endEdit();
  renderAttachments();
  ask(format);
}

/** The settings as request fields; empty ones are left to the server's defaults. */
function settings() {
  const fields = {};
  if (ui.temperature.value !== "") fields.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") fields.max_tokens = Number(ui.maxTokens.value);
  return fields;
}

/** The conversation as OpenAI messages: errors and empty (stopped) answers are left out. */
function messages() {
  const out = [];
  const system = ui.system.value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const turn of turns) {
    if (turn.role === "assistant" && turn.text) out.push({ role: "assistant", content: turn.text });
    if (turn.role !== "user") continue;
    if (!turn.images.length) {
      out.push({ role: "user", content: turn.text });
      continue;
    }
    const parts = turn.images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
    if (turn.text) parts.push({ type: "text", text: turn.text });
    out.push({ role: "user", content: parts });
  }
  return out;
}

/** Streams the answer to the conversation so far into a new assistant turn. */
async function ask(format) {
  const body = { model, messages: messages(), ...settings() };
  if (format) body.response_format = format;
  const answer = { role: "assistant", text: "", timings: null, usage: null, finish: null, stopped: false };
  turns.push(answer);
  controller = new AbortController();
  render();
  setBusy(true);
  const text = nodes.get(answer).querySelector(".text");
  try {
    for await (const chunk of streamChat(body, controller.signal)) {
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        answer.text += choice.delta.content;
        text.textContent = answer.text;
      }
      if (choice?.finish_reason) answer.finish = choice.finish_reason;
      if (chunk.usage) answer.usage = chunk.usage;
      if (chunk.timings) answer.timings = chunk.timings;
    }
  } catch (e) {
    if (e.name === "AbortError") answer.stopped = true;
    else failed(answer, e);
  } finally {
    controller = null;
    nodes.delete(answer); // rebuilt with its stats
    render();
    setBusy(false);
  }
}

/** The answer's place becomes one error line; a 401 asks for the key again. */
function failed(answer, error) {
  const i = turns.indexOf(answer);
  const message = error instanceof TypeError ? `cannot reach the server (${error.message})` : error.message;
  turns.splice(i, 1, { role: "error", text: `Error: ${message}` });
  if (error.status === 401) {
    document.getElementById("key-form").hidden = false;
    document.getElementById("api-key").focus();
  }
}

function addError(text) {
  turns.push({ role: "error", text: `Error: ${text}` });
  render();
}

function stop() {
  controller?.abort();
}

function clear() {
  stop();
  turns = [];
  cancelEdit();
  render();
  ui.input.focus();
}

function retry(turn) {
  if (controller) return;
  const format = responseFormat();
  if (format === undefined) return;
  turns = turns.slice(0, turns.indexOf(turn) + 1);
  cancelEdit();
  ask(format);
}

function edit(turn) {
  if (controller) return;
  editing = turn;
  ui.input.value = turn.text;
  pending = [...turn.images];
  renderAttachments();
  ui.editing.hidden = false;
  ui.input.focus();
}

function cancelEdit() {
  if (editing === null) return;
  ui.input.value = "";
  pending = [];
  renderAttachments();
  endEdit();
}

function endEdit() {
  editing = null;
  ui.editing.hidden = true;
}

// --------------------------------------------------------------------------------------- rendering
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key.includes("-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function setBusy(busy) {
  ui.stop.disabled = !busy;
  ui.send.disabled = busy;
  for (const button of ui.list.querySelectorAll(".turn-actions button")) button.disabled = busy;
}

function render() {
  ui.list.replaceChildren(...turns.map(turnNode));
  ui.list.lastElementChild?.scrollIntoView({ block: "end" });
}

function turnNode(turn) {
  if (!nodes.has(turn)) {
    const build = { user: userNode, assistant: answerNode, error: errorNode }[turn.role];
    nodes.set(turn, build(turn));
  }
  return nodes.get(turn);
}

function thumbnails(images) {
  return el("div", { className: "thumbnails" },
    ...images.map((image) => el("img", { src: image.url, alt: image.name })));
}

function userNode(turn) {
  const actions = el("div", { className: "turn-actions" },
    el("button", { type: "button", textContent: "Edit", onclick: () => edit(turn), "aria-label": "Edit this message" }),
    el("button", { type: "button", textContent: "Retry", onclick: () => retry(turn),
                   "aria-label": "Ask this message again" }));
  return el("li", { className: "turn user" }, el("span", { className: "who", textContent: "You" }),
    thumbnails(turn.images), el("p", { className: "text", textContent: turn.text }), actions);
}

function answerNode(turn) {
  const streaming = controller !== null && turn === turns[turns.length - 1] && !turn.finish && !turn.stopped;
  return el("li", { className: streaming ? "turn assistant streaming" : "turn assistant" },
    el("span", { className: "who", textContent: "FastVLM" }),
    el("p", { className: "text", textContent: turn.text }),
    el("p", { className: "stats", textContent: statsText(turn) }));
}

function errorNode(turn) {
  return el("li", { className: "turn error", role: "alert", textContent: turn.text });
}

function ms(value) {
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ms`;
}

/** TTFT, vision time, decode rate and cached tokens, as the server measured them (its ``timings``). */
function statsText(turn) {
  const parts = [];
  const t = turn.timings;
  if (t) {
    parts.push(`TTFT ${ms(t.ttft_ms)}`, `vision ${ms(t.vision_ms)}`, `${t.tokens_per_second.toFixed(1)} tokens/s`);
    parts.push(`${t.cached_tokens} cached tokens`);
  }
  if (turn.usage) parts.push(`${turn.usage.completion_tokens} tokens`);
  if (turn.finish === "length") parts.push("cut at max tokens");
  if (turn.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function renderAttachments() {
  ui.attachments.replaceChildren(...pending.map((image) => el("li", {},
    el("img", { src: image.url, alt: image.name }),
    el("button", { type: "button", textContent: "×", "aria-label": `Remove ${image.name}`,
                   onclick: () => removeImage(image) }))));
}

function removeImage(image) {
  pending = pending.filter((p) => p !== image);
  renderAttachments();
  ui.input.focus();
}
