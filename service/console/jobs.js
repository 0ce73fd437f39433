// Jobs: the fine-tuning history (running jobs and the records kept in the store), with each
// job's state, timings and metrics, and the curve of any job that trained.

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
