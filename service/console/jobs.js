// Jobs: the fine-tuning history (running jobs and the records kept in the store), with each
// job's state, timings and metrics, the curve of any job that trained and, for classes, each
// class's precision and recall and the confusion matrix on the validation split.

import { api, num } from "./api.js";
import { trainingChart } from "./charts.js";
import { bdi, byId, clear, el, errorParts, formatDuration, formatNumber, formatTime, say } from "./dom.js";

const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

function curveOf(job) {
  return (job.epochMetrics || []).map((p) => ({
    epoch: num(p.epoch),
    trainLoss: num(p.trainLoss),
    validationLoss: num(p.validationLoss),
    validationAccuracy: num(p.validationAccuracy),
  }));
}

const MATRIX_CLASSES = 20; // a wider confusion matrix is shown as its largest confusions
const SHOWN_CONFUSIONS = 20;

function percent(value) {
  return `${(num(value) * 100).toFixed(1)}%`;
}

/** The job's settings beyond the table's columns: augmentation and class weights. */
function settingsOf(config) {
  const parts = [];
  const augmentation = config.augmentation || {};
  if (num(augmentation.views)) {
    const kinds = [];
    if (augmentation.crop !== false) kinds.push(`random resized crop ${num(augmentation.cropScaleMin) || 0.08}–${num(augmentation.cropScaleMax) || 1}`);
    if (augmentation.horizontalFlip !== false) kinds.push("horizontal flip");
    parts.push(`Augmentation: ${num(augmentation.views)} views (${kinds.join(", ")}).`);
  }
  const weights = config.classWeights || {};
  if (weights.mode === "auto") parts.push("Class weights: auto (balanced from the counts).");
  else if (weights.weights && Object.keys(weights.weights).length) {
    parts.push(["Class weights: ", ...Object.entries(weights.weights).flatMap(([name, weight], i) => [i ? ", " : "", bdi(name), `=${formatNumber(weight)}`]), "."]);
  }
  return parts;
}

/** Per class precision, recall and support, and the confusion matrix (cells the server left
 * out are zero: protobuf's JSON drops zero fields, and the matrix comes as its non-zero cells). */
function classDetail(job) {
  const holder = clear(byId("jobs-classes"));
  const labels = job.labels || [];
  const metrics = job.metrics || {};
  const figures = metrics.classMetrics || [];
  for (const part of settingsOf(job.config || {})) holder.append(el("p", { class: "job-setting" }, part));
  if (!figures.length) return;
  const rows = figures.map((f, i) =>
    el(
      "tr",
      {},
      el("th", { scope: "row", class: "class-name" }, bdi(labels[i] ?? i)),
      el("td", { class: "number" }, percent(f.precision)),
      el("td", { class: "number" }, percent(f.recall)),
      el("td", { class: "number" }, String(num(f.support))),
    ),
  );
  holder.append(
    el("h3", {}, "Per class, on the validation split"),
    el(
      "div",
      { class: "table-wrap" },
      el(
        "table",
        { id: "jobs-class-table" },
        el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Class"), el("th", { scope: "col" }, "Precision"), el("th", { scope: "col" }, "Recall"), el("th", { scope: "col" }, "Examples"))),
        el("tbody", {}, rows),
      ),
    ),
  );
  const cells = (metrics.confusionMatrix || []).map((c) => ({ actual: num(c.actual), predicted: num(c.predicted), count: num(c.count) }));
  const size = figures.length;
  if (size <= MATRIX_CLASSES) {
    const matrix = Array.from({ length: size }, () => new Array(size).fill(0));
    for (const c of cells) if (c.actual < size && c.predicted < size) matrix[c.actual][c.predicted] = c.count;
    const most = Math.max(1, ...cells.map((c) => c.count));
    const body = matrix.map((row, a) =>
      el(
        "tr",
        {},
        el("th", { scope: "row", class: "class-name" }, bdi(labels[a] ?? a)),
        row.map((count, p) => {
          const cell = el("td", { class: `number confusion${a === p ? " diagonal" : ""}`, "data-actual": a, "data-predicted": p }, String(count));
          cell.style.setProperty("--share", String(count / most)); // CSSOM, which the page's policy allows
          return cell;
        }),
      ),
    );
    holder.append(
      el("h3", {}, "Confusion matrix"),
      el(
        "div",
        { class: "table-wrap" },
        el(
          "table",
          { id: "jobs-confusion", class: "confusion-matrix" },
          el("caption", {}, "Rows: the actual class; columns: the class predicted."),
          el("thead", {}, el("tr", {}, el("td", {}), labels.slice(0, size).map((label) => el("th", { scope: "col", class: "class-name" }, bdi(label))))),
          el("tbody", {}, body),
        ),
      ),
    );
  } else {
    const wrong = cells.filter((c) => c.actual !== c.predicted).sort((x, y) => y.count - x.count);
    holder.append(
      el("h3", {}, `Largest confusions (${Math.min(wrong.length, SHOWN_CONFUSIONS)} of ${wrong.length})`),
      el(
        "div",
        { class: "table-wrap" },
        el(
          "table",
          { id: "jobs-confusion" },
          el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Actual"), el("th", { scope: "col" }, "Predicted"), el("th", { scope: "col" }, "Examples"))),
          el(
            "tbody",
            {},
            wrong.slice(0, SHOWN_CONFUSIONS).map((c) => el("tr", {}, el("td", {}, bdi(labels[c.actual])), el("td", {}, bdi(labels[c.predicted])), el("td", { class: "number" }, String(c.count)))),
          ),
        ),
      ),
    );
  }
}

function showChart(job) {
  const config = job.config || {};
  say(byId("jobs-chart-title"), ["Job ", bdi(job.id), ": ", bdi(config.outputModel || ""), " on ", bdi(config.baseModel || "")]);
  const points = curveOf(job);
  const holder = byId("jobs-chart");
  if (!points.length) {
    clear(holder).append(el("p", {}, "This job trained no epochs."));
  } else {
    trainingChart(holder, points, num(config.epochs));
  }
  classDetail(job);
  byId("jobs-detail").hidden = false;
}

let shownJobs = "";

/** Reads the jobs again; ``quiet`` (the periodic refresh) redraws only when they changed and
 * leaves the status line alone. */
export async function refreshJobs({ quiet = false } = {}) {
  const status = byId("jobs-status");
  try {
    const answer = await api.jobs();
    const jobs = (answer.jobs || []).slice().sort((a, b) => num(b.createdAt) - num(a.createdAt));
    const seen = JSON.stringify(jobs);
    if (quiet && seen === shownJobs) return;
    shownJobs = seen;
    const body = clear(byId("jobs-body"));
    for (const job of jobs) {
      const config = job.config || {};
      const metrics = job.metrics || {};
      const state = job.state || "";
      const started = num(job.startedAt);
      const finished = num(job.finishedAt);
      const actions = el("div", { class: "actions" });
      const chart = el("button", { type: "button", "aria-label": `Chart of job ${job.id}` }, "Chart");
      chart.addEventListener("click", () => showChart(job));
      actions.append(chart);
      if (!TERMINAL.has(state)) {
        const cancel = el("button", { type: "button", "aria-label": `Cancel job ${job.id}` }, "Cancel");
        cancel.addEventListener("click", async () => {
          try {
            await api.cancel(job.id);
            await refreshJobs();
          } catch (error) {
            say(status, errorParts(error), "error");
          }
        });
        actions.append(cancel);
      }
      body.append(
        el(
          "tr",
          { "data-job": job.id },
          el("th", { scope: "row" }, el("code", { class: "job-id", title: job.id }, bdi(job.id))),
          el("td", {}, bdi(config.outputModel || "–"), el("small", { class: "reason" }, "on ", bdi(config.baseModel || "?"))),
          el("td", {}, el("span", { class: `state state-${state.toLowerCase()}` }, bdi(state)), job.error ? el("small", { class: "reason" }, bdi(job.error)) : null),
          el("td", { class: "nowrap" }, formatTime(job.createdAt)),
          el("td", { class: "nowrap" }, started && finished ? formatDuration(finished - started) : "–"),
          el("td", { class: "number" }, String(job.examples ?? 0)),
          el("td", { class: "number" }, `${num(metrics.epochsRun)}/${num(config.epochs)}`),
          el("td", { class: "number" }, formatNumber(metrics.trainLoss)),
          el("td", { class: "number" }, formatNumber(metrics.validationLoss)),
          el("td", { class: "number" }, metrics.validationAccuracy === undefined ? "–" : `${(num(metrics.validationAccuracy) * 100).toFixed(1)}%`),
          el("td", {}, actions),
        ),
      );
    }
    if (!quiet) say(status, jobs.length ? `${jobs.length} job${jobs.length === 1 ? "" : "s"}, updated ${new Date().toLocaleTimeString()}` : "No jobs yet.");
  } catch (error) {
    if (!quiet) say(status, errorParts(error), "error");
  }
}

export function setUpJobs() {
  byId("jobs-refresh").addEventListener("click", () => refreshJobs());
}
