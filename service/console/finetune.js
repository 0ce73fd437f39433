// Fine-tune: collect labelled examples (a folder of class folders, a zip of the same layout,
// or images added under a class name), check them, send them with the config as one multipart
// POST /v1/jobs (with upload progress), then follow the job's Server-Sent Events and chart
// each epoch. When it succeeds, the new model can be tried right there. Class names are held to
// the server's rule (labels.js) as they are added: a refused one is listed with the rule it
// breaks and blocks the upload until it is removed. The form's kinds, layers and defaults are the
// server's (<form id="ft-form" data-fine-tuning>, from vision_client.protocol.vocabulary), never
// restated here.

import { api, num } from "./api.js";
import { trainingChart } from "./charts.js";
import { classifier } from "./classify.js";
import { append, bdi, byId, clear, dropZone, el, errorParts, formatNumber, say } from "./dom.js";
import { labelProblem, visibleName } from "./labels.js";
import { onModels, refreshModels } from "./models.js";
import * as zip from "./zip.js";

const IMAGE_NAME = /\.(jpe?g|png|webp|bmp|gif)$/i;
export const FEW_EXAMPLES = 5;

const examples = new Map(); // class name -> [File]
const refused = new Map(); // class name the server would refuse -> { problem, source, files }
let skipped = 0;
let running = null; // { controller, jobId }
let tryModel = "";

function isImage(file) {
  return IMAGE_NAME.test(file.name) || (file.type || "").startsWith("image/");
}

function isHidden(path) {
  return path.split("/").some((part) => part.startsWith(".") || part === "__MACOSX");
}

/** Adds ``file`` under class ``label`` (from a ``source``: "folder" or "class name"); false when
 * the name breaks the server's rule (the class is listed as refused instead). */
function add(label, file, source) {
  const name = label.trim();
  const problem = labelProblem(name);
  if (problem) {
    const entry = refused.get(name) || { problem, source, files: 0 };
    entry.files += 1;
    refused.set(name, entry);
    return false;
  }
  if (!examples.has(name)) examples.set(name, []);
  examples.get(name).push(file);
  return true;
}

/** The sentence that says why a class was refused, naming it (its refused characters spelled out). */
function refusal(name, { problem, source, files }) {
  const what = source === "folder" ? "Folder" : "Class name";
  return [`${what} “`, bdi(visibleName(name)), `” (${files} image${files === 1 ? "" : "s"}) was not added: the name ${problem}.`];
}

/** The class of a path ``a/b/class/image.png``: the image's folder; null when it has none. */
function classOf(path) {
  const parts = path.split("/").filter(Boolean);
  return parts.length >= 2 ? parts[parts.length - 2] : null;
}

function addFiles(files, labelOf, source) {
  let added = 0;
  for (const file of files) {
    const label = labelOf(file);
    if (label === null || !isImage(file)) {
      skipped += 1;
      continue;
    }
    if (add(label, file, source)) added += 1;
  }
  render();
  return added;
}

/** "Added 12 images from the folder." and, when some classes were refused, how many and where to look. */
function added(count, where) {
  const text = `Added ${count} images ${where}.`;
  if (!refused.size) return [text, "ok"];
  return [`${text} ${refused.size} class${refused.size === 1 ? " was" : "es were"} refused: see the list below.`, "error"];
}

async function addZip(file) {
  const status = byId("ft-examples-status");
  say(status, `Reading ${file.name}…`);
  try {
    const buffer = await file.arrayBuffer();
    let count = 0;
    for (const entry of zip.entries(buffer)) {
      const label = classOf(entry.name);
      const base = entry.name.split("/").pop();
      if (isHidden(entry.name) || label === null || !IMAGE_NAME.test(base)) {
        skipped += 1;
        continue;
      }
      const blob = await zip.read(buffer, entry);
      if (add(label, new File([blob], base, { type: "" }), "folder")) count += 1;
    }
    render();
    say(status, ...added(count, `from ${file.name}`));
  } catch (error) {
    say(status, [`${file.name}: `, ...errorParts(error)], "error");
  }
}

/** Warnings about the examples: each a sentence, as a list of text and isolated names. */
export function warnings() {
  const found = [];
  const names = [...examples.keys()];
  if (names.length === 1) found.push(["Only one class (", bdi(names[0]), "): a classifier needs at least two."]);
  for (const [name, files] of examples) {
    if (files.length < FEW_EXAMPLES) found.push(["Class ", bdi(name), ` has only ${files.length} image${files.length > 1 ? "s" : ""}; a few more per class train better.`]);
    const seen = new Set();
    const repeated = new Set();
    for (const file of files) (seen.has(file.name) ? repeated : seen).add(file.name);
    if (repeated.size) {
      const shown = [...repeated].slice(0, 3).flatMap((file, i) => (i ? [", ", bdi(file)] : [bdi(file)]));
      found.push(["Class ", bdi(name), ` has ${repeated.size} file name${repeated.size > 1 ? "s" : ""} more than once (`, ...shown, "): the same image added twice?"]);
    }
  }
  const folded = new Map();
  for (const name of names) {
    const key = name.toLowerCase();
    folded.set(key, [...(folded.get(key) || []), name]);
  }
  for (const group of folded.values()) {
    if (group.length > 1) found.push(["Classes ", ...group.flatMap((name, i) => (i ? [" and ", bdi(name)] : [bdi(name)])), " differ only in case: one class or two?"]);
  }
  if (skipped) found.push([`${skipped} file${skipped > 1 ? "s were" : " was"} skipped: not an image, or not inside a class folder.`]);
  return found;
}

function render() {
  const body = clear(byId("ft-classes-body"));
  let total = 0;
  const sorted = [...examples].sort(([a], [b]) => a.localeCompare(b, undefined, { numeric: true }));
  for (const [name, files] of sorted) {
    total += files.length;
    const remove = el("button", { type: "button", "aria-label": `Remove class ${name}` }, "Remove");
    remove.addEventListener("click", () => {
      examples.delete(name);
      render();
    });
    body.append(el("tr", {}, el("th", { scope: "row", class: "class-name" }, bdi(name)), el("td", { class: "number" }, String(files.length)), el("td", {}, remove)));
  }
  for (const [name, entry] of refused) {
    const remove = el("button", { type: "button", "aria-label": `Remove refused class ${visibleName(name)}` }, "Remove");
    remove.addEventListener("click", () => {
      refused.delete(name);
      render();
    });
    body.append(
      el("tr", { class: "refused" }, el("th", { scope: "row", class: "class-name" }, bdi(visibleName(name))), el("td", { class: "number" }, "refused"), el("td", {}, remove)),
    );
  }
  byId("ft-summary").textContent = examples.size ? `${total} images in ${examples.size} classes` : "No examples yet.";
  const list = clear(byId("ft-warnings"));
  for (const [name, entry] of refused) list.append(el("li", { class: "refusal" }, ...refusal(name, entry)));
  for (const warning of warnings()) list.append(el("li", {}, ...warning));
}

function value(id) {
  return byId(id).value.trim();
}

function number(id) {
  const text = value(id);
  return text === "" ? undefined : Number(text);
}

/** The fine-tuning vocabulary the server wrote into the page: kinds, layers, defaults, its limits. */
function vocabulary() {
  return JSON.parse(byId("ft-form").dataset.fineTuning || "null");
}

/** A setting of the form that cannot be sent as it is; its message says how to fix it. */
class FormError extends Error {}

/** A custom head's layers: the JSON list the REST API takes (HeadLayer messages). */
function layers() {
  const text = value("ft-layers");
  const example = JSON.stringify((vocabulary() || {}).layers_example || []);
  if (!text) throw new FormError(`A custom head needs its layers: a JSON list such as ${example}`);
  let parsed;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new FormError(`Layers: not valid JSON (${error.message}); write a list such as ${example}`);
  }
  if (!Array.isArray(parsed)) throw new FormError(`Layers: a JSON list of layers is needed, such as ${example}`);
  return parsed;
}

/** The FineTuneConfig as protobuf's JSON (the form's blank fields take the server's defaults);
 * a FormError for a setting that cannot be sent. */
export function config() {
  const head = { kind: value("ft-head") };
  if (head.kind === "custom") head.layers = layers();
  if (head.kind === "two_layer" || head.kind === "parallel") head.hidden = number("ft-hidden");
  if (head.kind === "parallel") head.blocks = number("ft-blocks");
  head.dropout = number("ft-dropout");
  const optimizer = { kind: value("ft-optimizer"), lr: number("ft-lr"), weightDecay: number("ft-weight-decay") };
  if (optimizer.kind === "sgd") optimizer.momentum = number("ft-momentum");
  else Object.assign(optimizer, { beta1: number("ft-beta1"), beta2: number("ft-beta2") });
  return {
    baseModel: value("ft-base"),
    outputModel: value("ft-output"),
    head,
    optimizer,
    loss: "cross_entropy",
    epochs: number("ft-epochs"),
    batchSize: number("ft-batch-size"),
    validationFraction: number("ft-validation"),
    earlyStoppingPatience: number("ft-patience"),
    seed: value("ft-seed") || undefined, // uint64: a string in protobuf's JSON
    trainBackboneBlocks: number("ft-backbone-blocks"),
    backboneLrFactor: number("ft-backbone-lr-factor"),
    replace: byId("ft-replace").checked,
    refit: byId("ft-refit").checked,
    dataset: value("ft-dataset") || undefined, // images the server reads instead of uploaded ones
  };
}

/** Builds the form's choices and defaults from the server's vocabulary. */
function setUpSettings() {
  const known = vocabulary();
  if (!known) return;
  const plain = (text) => String(text || "").replaceAll("`", "");
  const head = byId("ft-head");
  for (const kind of known.head_kinds) head.append(el("option", { value: kind }, `${kind} (${plain(known.head_help[kind])})`));
  const optimizer = byId("ft-optimizer");
  for (const kind of known.optimizer_kinds) optimizer.append(el("option", { value: kind }, kind));
  const d = known.defaults;
  head.value = d.head.kind;
  optimizer.value = d.optimizer.kind;
  const values = {
    "ft-hidden": d.head.hidden, "ft-blocks": d.head.blocks, "ft-dropout": d.head.dropout,
    "ft-lr": d.optimizer.lr, "ft-weight-decay": d.optimizer.weight_decay, "ft-momentum": d.optimizer.momentum,
    "ft-beta1": d.optimizer.beta1, "ft-beta2": d.optimizer.beta2, "ft-epochs": d.epochs, "ft-batch-size": d.batch_size,
    "ft-validation": d.validation_fraction, "ft-patience": d.early_stopping_patience, "ft-seed": d.seed,
    "ft-backbone-blocks": d.train_backbone_blocks, "ft-backbone-lr-factor": d.backbone_lr_factor,
  };
  for (const [id, setting] of Object.entries(values)) byId(id).value = String(setting);
  byId("ft-refit").checked = d.refit;
  byId("ft-replace").checked = d.replace;
  byId("ft-layers").placeholder = JSON.stringify(known.layers_example, null, 1);
  const kinds = el("ul", { class: "layer-kinds" });
  for (const [kind, about] of Object.entries(known.layers)) {
    const fields = about.fields.length ? ` (${about.fields.join(", ")})` : "";
    kinds.append(el("li", {}, el("code", {}, kind), `${fields}: ${plain(about.help)}`));
  }
  const blocks = Object.entries(known.backbone_blocks || {}).map(([model, names]) => `${model}: ${names.length} (${names.join(", ")})`);
  if (blocks.length) byId("ft-backbone-blocks-hint").textContent = `The last blocks of the base model's backbone trained with the head; 0 keeps it frozen. Blocks, first to last: ${blocks.join("; ")}.`;
  const { max_layers: most, max_width: widest } = known.limits || {};
  append(
    clear(byId("ft-layers-hint")),
    `A list of layers, then a Linear to the outputs. At most ${most} layers (those in parallel branches counted), widths up to ${widest}. Kinds:`,
    kinds,
  );
}

function showFields() {
  const head = value("ft-head");
  byId("ft-hidden-field").hidden = head !== "two_layer" && head !== "parallel";
  byId("ft-blocks-field").hidden = head !== "parallel";
  byId("ft-layers-field").hidden = head !== "custom";
  const sgd = value("ft-optimizer") === "sgd";
  byId("ft-momentum-field").hidden = !sgd;
  byId("ft-beta1-field").hidden = sgd;
  byId("ft-beta2-field").hidden = sgd;
}

function setRunning(on) {
  byId("ft-start").disabled = on;
  byId("ft-cancel").disabled = !on;
}

function drawChart(points, epochs) {
  trainingChart(byId("ft-chart"), points, epochs);
}

/** Forgets the previous job on screen (its id, chart, progress and try-it panel): a new start,
 * refused or not, never shows the last job's figures as if they were its own. */
function resetJob() {
  byId("ft-job").textContent = "";
  clear(byId("ft-chart"));
  byId("ft-upload").value = 0;
  byId("ft-progress").value = 0;
  byId("ft-try").hidden = true;
}

async function start(event) {
  event.preventDefault();
  const status = byId("ft-status");
  let settings;
  try {
    settings = config();
  } catch (error) {
    if (!(error instanceof FormError)) throw error;
    resetJob();
    say(status, error.message, "error");
    byId("ft-layers").focus();
    return;
  }
  resetJob();
  if (refused.size) {
    say(status, `${refused.size} class${refused.size === 1 ? " has a name" : "es have names"} the server would refuse: rename ${refused.size === 1 ? "it" : "them"} and add ${refused.size === 1 ? "it" : "them"} again, or remove ${refused.size === 1 ? "it" : "them"} from the list.`, "error");
    return;
  }
  if (!examples.size && !settings.dataset) {
    say(status, "Add examples first: a folder, a zip, or images under a class name; or name a dataset.", "error");
    return;
  }
  if (examples.size && settings.dataset) {
    say(status, "Either upload examples or name a dataset, not both: clear the examples or the dataset.", "error");
    return;
  }
  if (!settings.outputModel) {
    say(status, "Name the new model (Output model).", "error");
    byId("ft-output").focus();
    return;
  }
  const form = new FormData();
  form.append("config", new Blob([JSON.stringify(settings)], { type: "application/json" }), "config.json");
  for (const [label, files] of examples) for (const file of files) form.append(label, file, file.name); // none with a dataset
  const controller = new AbortController();
  running = { controller, jobId: "" };
  setRunning(true);
  const uploadBar = byId("ft-upload");
  const progress = byId("ft-progress");
  const points = [];
  say(status, "Uploading the examples…");
  try {
    const job = await api.createJob(form, (loaded, total) => {
      uploadBar.value = loaded / total;
      say(status, `Uploading the examples: ${Math.round((100 * loaded) / total)}%`);
    }, controller.signal);
    uploadBar.value = 1;
    running.jobId = job.id;
    say(byId("ft-job"), ["Job ", bdi(job.id)]);
    drawChart(points, settings.epochs);
    say(status, ["Job ", bdi(job.id), ` ${String(job.state || "").toLowerCase()}.`]);
    let last = null;
    await api.watchJob(job.id, (kind, data) => {
      last = { kind, data };
      progress.value = num(data.progress);
      if (kind === "epoch") {
        points.push({
          epoch: num(data.epoch),
          trainLoss: num(data.trainLoss),
          validationLoss: num(data.validationLoss),
          validationAccuracy: num(data.validationAccuracy),
        });
        drawChart(points, num(data.epochs));
        const eta = num(data.etaSeconds);
        say(status, `Epoch ${num(data.epoch)} of ${num(data.epochs)}: train loss ${formatNumber(num(data.trainLoss), 4)}${eta ? `, about ${Math.ceil(eta)} s left` : ""}`);
      } else if (kind === "features" || kind === "queued") {
        say(status, data.message ? ["Job ", bdi(job.id), ": ", bdi(data.message)] : ["Job ", bdi(job.id), ` ${kind}.`]);
      }
    }, controller.signal);
    finish(job.id, last, settings.outputModel);
  } catch (error) {
    if (!running.jobId) resetJob(); // refused: no job of this start exists
    say(status, errorParts(error), "error");
  } finally {
    running = null;
    setRunning(false);
  }
}

function finish(jobId, last, outputModel) {
  const status = byId("ft-status");
  if (!last) {
    say(status, ["Job ", bdi(jobId), ": the event stream ended early; see Jobs."], "error");
    return;
  }
  const { kind, data } = last;
  if (kind === "succeeded") {
    byId("ft-progress").value = 1;
    say(status, ["Job ", bdi(jobId), " succeeded: ", bdi(outputModel), " is served."], "ok");
    tryModel = outputModel;
    append(clear(byId("ft-try-title")), "Try ", bdi(outputModel));
    byId("ft-try").hidden = false;
    refreshModels();
  } else if (kind === "cancelled") {
    say(status, ["Job ", bdi(jobId), " was cancelled."], "error");
  } else {
    say(status, ["Job ", bdi(jobId), ` ${kind}: `, bdi(data.message || "no reason given")], "error");
  }
}

async function cancel() {
  if (!running) return;
  const status = byId("ft-status");
  if (!running.jobId) {
    running.controller.abort();
    say(status, "Upload cancelled.", "error");
    return;
  }
  const jobId = running.jobId;
  say(status, ["Cancelling job ", bdi(jobId), "…"]);
  try {
    await api.cancel(jobId); // the job's last event (cancelled) may come before this answer
  } catch (error) {
    say(status, errorParts(error), "error");
  }
}

export function setUpFineTune() {
  const folder = byId("ft-folder");
  folder.addEventListener("change", () => {
    const count = addFiles(folder.files, (file) => (isHidden(file.webkitRelativePath || file.name) ? null : classOf(file.webkitRelativePath || "")), "folder");
    say(byId("ft-examples-status"), ...added(count, "from the folder"));
    folder.value = "";
  });
  const archive = byId("ft-zip");
  archive.addEventListener("change", async () => {
    for (const file of archive.files) await addZip(file);
    archive.value = "";
  });
  const classFiles = byId("ft-class-files");
  const addToClass = (files) => {
    const label = value("ft-class-name");
    if (!label) {
      say(byId("ft-examples-status"), "Type a class name first, then add its images.", "error");
      byId("ft-class-name").focus();
      return;
    }
    const problem = labelProblem(label);
    if (problem) {
      say(byId("ft-examples-status"), ["Class name “", bdi(visibleName(label)), `” refused: the name ${problem}. No image was added.`], "error");
      byId("ft-class-name").focus();
      return;
    }
    const count = addFiles(files, () => label, "class name");
    say(byId("ft-examples-status"), [`Added ${count} images to class `, bdi(label), "."], "ok");
  };
  classFiles.addEventListener("change", () => {
    addToClass(classFiles.files);
    classFiles.value = "";
  });
  const zone = byId("ft-class-drop");
  dropZone(zone, classFiles, addToClass);
  byId("ft-clear").addEventListener("click", () => {
    examples.clear();
    refused.clear();
    skipped = 0;
    render();
    say(byId("ft-examples-status"), "Examples cleared.");
  });
  setUpSettings();
  byId("ft-head").addEventListener("change", showFields);
  byId("ft-optimizer").addEventListener("change", showFields);
  byId("ft-form").addEventListener("submit", start);
  byId("ft-cancel").addEventListener("click", cancel);
  classifier(byId("ft-try-body"), "ft-try", () => tryModel);
  onModels((list) => {
    const select = byId("ft-base");
    const chosen = select.value;
    clear(select);
    for (const model of list.filter((m) => m.platform !== "vision_finetuned")) {
      select.append(el("option", { value: model.name, selected: model.name === chosen }, model.name));
    }
  });
  showFields();
  setRunning(false);
  render();
}
