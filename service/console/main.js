// The console's entry point: the token field, the views (one section each, chosen by the URL's
// fragment: #models, #classify, #finetune, #jobs, #throughput) and their set-up.

import { setToken, token } from "./api.js";
import { classifier } from "./classify.js";
import { byId, clear, el, say } from "./dom.js";
import { setUpFineTune } from "./finetune.js";
import { refreshJobs, setUpJobs } from "./jobs.js";
import { onModels, refreshModels, setUpModels } from "./models.js";
import { sampleThroughput } from "./throughput.js";

const VIEWS = ["models", "classify", "finetune", "jobs", "throughput"];
const REFRESH_SECONDS = 5;
let shown = "models";

function show(view) {
  const name = VIEWS.includes(view) ? view : "models";
  shown = name;
  for (const other of VIEWS) {
    byId(`view-${other}`).hidden = other !== name;
    const link = byId(`nav-${other}`);
    if (other === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name === "models") refreshModels();
  if (name === "jobs") refreshJobs();
  document.title = `${byId(`nav-${name}`).textContent} · vision-serving console`;
}

function tokenState() {
  say(byId("token-state"), token() ? "Token set for this tab" : "No token set");
}

function setUpToken() {
  const input = byId("token");
  byId("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    tokenState();
  });
  byId("token-forget").addEventListener("click", () => {
    setToken("");
    input.value = "";
    tokenState();
  });
  tokenState();
}

function setUpClassify() {
  const select = byId("classify-model");
  classifier(byId("classify-body"), "classify", () => select.value);
  onModels((list) => {
    const chosen = select.value;
    clear(select);
    for (const model of list) {
      const label = model.state === "READY" ? model.name : `${model.name} (${String(model.state).toLowerCase()})`;
      select.append(el("option", { value: model.name, selected: model.name === chosen }, label));
    }
  });
}

setUpToken();
setUpModels();
setUpClassify();
setUpFineTune();
setUpJobs();
window.addEventListener("hashchange", () => show(location.hash.slice(1)));
show(location.hash.slice(1));
if (location.hash.slice(1) !== "models") refreshModels();
sampleThroughput(true);

// Models and Jobs follow the server while on screen, unless the keyboard is in their table
// (rebuilding the rows would take the focus away).
setInterval(() => {
  if (document.hidden || !["models", "jobs"].includes(shown)) return;
  if (byId(`${shown}-body`).contains(document.activeElement)) return;
  if (shown === "models") refreshModels({ quiet: true });
  else refreshJobs({ quiet: true });
}, REFRESH_SECONDS * 1000);
