// Models: every model the server knows, its state, its versions and where it runs; load, unload,
// delete and roll back to a kept version (management calls: they need the token when the server
// has a token file).

import { api } from "./api.js";
import { bdi, byId, clear, el, errorParts, say } from "./dom.js";

let listeners = [];
let current = [];

/** ``callback(models)`` after each refresh (the other views' model pickers follow it). */
export function onModels(callback) {
  listeners.push(callback);
  if (current.length) callback(current);
}

export function models() {
  return current;
}

/** Reads the models again; ``quiet`` (the periodic refresh) changes nothing on screen unless
 * the models changed, and leaves the status line (it may hold the answer to an action) alone. */
export async function refreshModels({ quiet = false } = {}) {
  const status = byId("models-status");
  try {
    const answer = await api.models();
    const models = answer.models || [];
    const changed = JSON.stringify(models) !== JSON.stringify(current);
    current = models;
    if (changed || !quiet) render(current);
    if (!quiet) say(status, `${current.length} model${current.length === 1 ? "" : "s"}, updated ${new Date().toLocaleTimeString()}`);
    if (changed || !quiet) for (const callback of listeners) callback(current);
  } catch (error) {
    if (!quiet) say(status, errorParts(error), "error");
  }
}

function render(list) {
  const body = clear(byId("models-body"));
  for (const model of list) {
    const state = el("span", { class: `state state-${(model.state || "").toLowerCase()}` }, bdi(model.state || ""));
    const actions = el("div", { class: "actions" });
    const act = (text, run, confirmText) => {
      const button = el("button", { type: "button", "aria-label": `${text} ${model.name}` }, text);
      button.addEventListener("click", async () => {
        if (confirmText && !window.confirm(confirmText)) return;
        button.disabled = true;
        say(byId("models-status"), [`${text} `, bdi(model.name), "…"]);
        try {
          await run(model.name);
          await refreshModels();
          say(byId("models-status"), [`${text} `, bdi(model.name), ": done"], "ok");
        } catch (error) {
          say(byId("models-status"), [`${text} `, bdi(model.name), ": ", ...errorParts(error)], "error");
        } finally {
          button.disabled = false;
        }
      });
      actions.append(button);
    };
    if (model.state === "READY") act("Unload", api.unload);
    else act("Load", api.load);
    const versions = model.versions || [];
    if (model.platform === "vision_finetuned" && versions.length > 1) {
      const older = versions.filter((v) => v !== model.version);
      const picker = el(
        "select",
        { "aria-label": `Version of ${model.name} to roll back to` },
        ...older.map((v) => el("option", { value: v }, `version ${v}`)),
      );
      actions.append(picker);
      act("Roll back", (name) => api.rollback(name, picker.value));
    }
    if (model.platform === "vision_finetuned") {
      act("Delete", api.deleteModel, `Delete the fine-tuned model ${model.name} from the store? This cannot be undone.`);
    }
    body.append(
      el(
        "tr",
        {},
        el("th", { scope: "row" }, bdi(model.name)),
        el("td", {}, state, model.reason ? el("small", { class: "reason" }, bdi(model.reason)) : null),
        el("td", {}, versionCell(model)),
        el("td", {}, bdi(model.runtime || "–")),
        el("td", {}, bdi((model.devices || []).join(", ") || "–")),
        el("td", { class: "number" }, String(model.numOutputs ?? "–")),
        el("td", {}, bdi(model.baseModel || "–")),
        el("td", { class: "number" }, String(model.pendingImages ?? "0")),
        el("td", {}, actions),
      ),
    );
  }
}

/** The versions a request may name, the one served in bold (it answers requests without a version). */
function versionCell(model) {
  const versions = model.versions && model.versions.length ? model.versions : [model.version || "–"];
  const cell = el("span", { class: "versions", title: `version ${model.version || "–"} is served` });
  versions.forEach((v, i) => {
    if (i) cell.append(" ");
    cell.append(v === model.version ? el("strong", {}, bdi(v)) : bdi(v));
  });
  return cell;
}

export function setUpModels() {
  byId("models-refresh").addEventListener("click", () => refreshModels());
}
