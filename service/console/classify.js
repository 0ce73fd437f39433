// Classify: images dropped, pasted or picked, each sent to a model through the Open Inference
// Protocol's REST binding (POST /v2/models/{name}/infer, the IMAGE input as base64). The
// top 5 are the softmax of the whole LOGITS output, labelled from /v1/models/{name}, as the
// Python SDK does; the version that answered and the round-trip time are shown with them.

import { api } from "./api.js";
import { bdi, clear, dropZone, el, errorParts, formatScore, say } from "./dom.js";

const TOP = 5;
const labelCache = new Map(); // "name@version" -> labels

function dataUrlBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.addEventListener("load", () => resolve(String(reader.result).split(",", 2)[1] || ""));
    reader.addEventListener("error", () => reject(reader.error));
    reader.readAsDataURL(file);
  });
}

async function labelsOf(name, version) {
  const key = `${name}@${version}`;
  if (!labelCache.has(key)) {
    const info = await api.model(name);
    labelCache.set(`${name}@${info.version || version}`, info.labels || []);
    if (!labelCache.has(key)) return info.labels || [];
  }
  return labelCache.get(key);
}

export function softmaxTop(logits, labels, k) {
  const max = Math.max(...logits);
  const exps = logits.map((v) => Math.exp(v - max));
  const sum = exps.reduce((a, b) => a + b, 0);
  return logits
    .map((_, index) => ({ index, score: exps[index] / sum, label: labels[index] ?? String(index) }))
    .sort((a, b) => b.score - a.score || a.index - b.index)
    .slice(0, k);
}

/** Classifies ``file`` with ``model``: { top, version, milliseconds }. */
export async function classify(model, file) {
  const data = await dataUrlBase64(file);
  const started = performance.now();
  const answer = await api.infer(model, {
    inputs: [{ name: "IMAGE", shape: [1], datatype: "BYTES", parameters: { content_type: "base64" }, data: [data] }],
    outputs: [{ name: "LOGITS" }],
  });
  const milliseconds = performance.now() - started;
  const output = (answer.outputs || []).find((o) => o.name === "LOGITS");
  if (!output) throw new Error("the answer has no LOGITS output");
  const version = String(answer.model_version || "");
  const labels = await labelsOf(model, version);
  return { top: softmaxTop(output.data.map(Number), labels, TOP), version, milliseconds, model: answer.model_name || model };
}

function resultItem(file) {
  const preview = el("img", { alt: `the image ${file.name}`, class: "preview" });
  preview.src = URL.createObjectURL(file);
  preview.addEventListener("load", () => URL.revokeObjectURL(preview.src), { once: true });
  const body = el("div", { class: "result-body" }, el("p", { class: "result-name" }, bdi(file.name || "pasted image")));
  const status = el("p", { class: "result-meta", role: "status" }, "classifying…");
  body.append(status);
  return { item: el("li", { class: "result" }, preview, body), body, status };
}

function bars(top) {
  const list = el("ol", { class: "bars" });
  for (const prediction of top) {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${(prediction.score * 100).toFixed(1)}%`;
    list.append(
      el(
        "li",
        { "data-index": prediction.index },
        el("span", { class: "bar-label", title: prediction.label }, bdi(prediction.label)),
        el("span", { class: "bar", "aria-hidden": "true" }, fill),
        el("span", { class: "score", title: String(prediction.score) }, formatScore(prediction.score)),
      ),
    );
  }
  return list;
}

/**
 * A drop zone, a file picker and a result list inside ``container``, classifying with the
 * model ``model()`` names. ``id`` prefixes the ids of its inputs.
 */
export function classifier(container, id, model) {
  const picker = el("input", { type: "file", id: `${id}-files`, accept: "image/*", multiple: true });
  const zone = el(
    "div",
    { class: "drop", tabindex: "0", id: `${id}-drop`, role: "group", "aria-label": "Drop or paste images here" },
    "Drop images here, or paste one (Ctrl+V) while this view is open.",
  );
  const status = el("p", { class: "status", role: "status", id: `${id}-status` });
  const results = el("ol", { class: "results", id: `${id}-results`, "aria-live": "polite" });
  container.append(
    el("div", { class: "field" }, el("label", { for: picker.id }, "Pick images"), picker),
    zone,
    status,
    results,
  );

  async function run(files) {
    const images = [...files].filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|webp|bmp|gif)$/i.test(f.name));
    if (!images.length) {
      say(status, "No images among those files (JPEG, PNG, WebP, BMP or GIF).", "error");
      return;
    }
    const name = model();
    if (!name) {
      say(status, "Choose a model first.", "error");
      return;
    }
    clear(results);
    say(status, [`Classifying ${images.length} image${images.length > 1 ? "s" : ""} with `, bdi(name), "…"]);
    let failures = 0;
    for (const file of images) {
      const { item, body, status: line } = resultItem(file);
      results.append(item);
      try {
        const answer = await classify(name, file);
        say(line, [bdi(answer.model), " version ", bdi(answer.version), ` · ${answer.milliseconds.toFixed(0)} ms`], "ok");
        line.classList.add("done");
        body.append(bars(answer.top));
      } catch (error) {
        failures += 1;
        say(line, errorParts(error), "error");
      }
    }
    say(status, failures ? `${failures} of ${images.length} failed.` : [`Done: ${images.length} classified with `, bdi(name), "."], failures ? "error" : "ok");
  }

  picker.addEventListener("change", () => run(picker.files));
  dropZone(zone, picker, run);
  document.addEventListener("paste", (event) => {
    if (!container.offsetParent) return; // not the view on screen
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) {
      event.preventDefault();
      run(files);
    }
  });
  return { run };
}
