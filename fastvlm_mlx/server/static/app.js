// The page's shell: the API key, the mode tabs and the status line; the views are chat.js and live.js.
import { apiKey, request, setApiKey } from "./api.js";
import * as chat from "./chat.js";
import * as live from "./live.js";

const status = document.getElementById("status");
const views = { chat: [document.getElementById("tab-chat"), document.getElementById("chat-view"), chat],
                live: [document.getElementById("tab-live"), document.getElementById("live-view"), live] };

export function showStatus(text) {
  status.textContent = text;
}

function choose(mode) {
  for (const [name, [tab, view, module]] of Object.entries(views)) {
    const on = name === mode;
    tab.setAttribute("aria-pressed", String(on));
    view.hidden = !on;
    if (on) module.show?.();
    else module.hide?.();
  }
}

/** A model's id as shown: a local path by its folder's name, a hub id as it is. */
function shortName(id) {
  return /^([A-Za-z]:)?[\\/.~]/.test(id) ? id.split(/[\\/]/).filter(Boolean).pop() : id;
}

/** The model's id, which every request names; a 401 asks for the key (once) and sends nothing more. */
async function connect() {
  const form = document.getElementById("key-form");
  try {
    const models = await request("/v1/models");
    form.hidden = true;
    showStatus(`Model: ${shortName(models.data[0].id)}`);
    status.title = models.data[0].id;
    return models.data[0].id;
  } catch (e) {
    form.hidden = false;
    const first = e.status === 401 && !apiKey(); // no key given yet: a request, not an error
    showStatus(first ? "This server needs an API key." : `Error: ${e.message}`);
    document.getElementById("api-key").focus();
    return null;
  }
}

async function start() {
  document.getElementById("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey(document.getElementById("api-key").value.trim());
    const model = await connect();
    if (model) ready(model);
  });
  for (const [name, [tab]] of Object.entries(views)) tab.addEventListener("click", () => choose(name));
  const model = await connect();
  if (model) ready(model);
}

let started = false;
function ready(model) {
  if (started) return;
  started = true;
  chat.init(document.getElementById("chat-view"), model);
  live.init(document.getElementById("live-view"), model);
  choose("chat");
}

start();
