// Throughput: images per second on each device and the queue depth of each model, over the
// last minutes. The server reports running totals (GET /v1/throughput, from the same counter
// as vision_inference_images_total); the console samples them every few seconds and takes
// the rate between samples, as Prometheus's rate() does.

import { api, num } from "./api.js";
import { lineChart } from "./charts.js";
import { bdi, byId, clear, el, errorParts, say } from "./dom.js";

export const SAMPLE_SECONDS = 2;
export const WINDOW_SECONDS = 5 * 60;
const samples = []; // { time, images: Map(device -> total), queues: Map(model -> depth) }
let timer = null;

function record(answer) {
  const images = new Map();
  for (const row of answer.images || []) {
    const device = row.device || "?";
    images.set(device, (images.get(device) || 0) + num(row.images));
  }
  const queues = new Map((answer.queues || []).map((q) => [q.model, num(q.pendingImages)]));
  samples.push({ time: num(answer.time), images, queues });
  while (samples.length && samples[samples.length - 1].time - samples[0].time > WINDOW_SECONDS) samples.shift();
}

function rates() {
  const series = new Map();
  for (let i = 1; i < samples.length; i++) {
    const [before, after] = [samples[i - 1], samples[i]];
    const seconds = after.time - before.time;
    if (seconds <= 0) continue;
    for (const [device, total] of after.images) {
      const rate = Math.max(0, (total - (before.images.get(device) || 0)) / seconds);
      if (!series.has(device)) series.set(device, []);
      series.get(device).push({ x: after.time, y: rate, label: `${rate.toFixed(1)} images/s` });
    }
  }
  return series;
}

/** The time axis: the last five minutes, or less while the page has been open less long. */
function timeAxis() {
  const now = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  const first = samples.length ? samples[0].time : now;
  const span = Math.min(WINDOW_SECONDS, Math.max(60, now - first));
  const step = span <= 60 ? 10 : span <= 120 ? 20 : 60;
  const ticks = [];
  for (let ago = 0; ago <= span; ago += step) ticks.unshift(now - ago);
  return { now, xMin: now - span, ticks, ago: (t) => `${Math.round(t - now)} s` };
}

function draw() {
  const { now, xMin, ticks, ago } = timeAxis();
  const rateSeries = [...rates()].map(([device, points]) => ({ name: device, key: `device-${device}`, axis: "left", points, dots: false }));
  lineChart(byId("throughput-chart"), {
    title: "Images per second by device",
    xLabel: "seconds ago",
    leftLabel: "images/s",
    xMin,
    xMax: now,
    xTickValues: ticks,
    xTicks: ago,
    series: rateSeries,
  });
  const models = new Set(samples.flatMap((s) => [...s.queues.keys()]));
  lineChart(byId("queue-chart"), {
    title: "Images waiting in each model's queue",
    xLabel: "seconds ago",
    leftLabel: "images queued",
    leftWhole: true,
    xMin,
    xMax: now,
    xTickValues: ticks,
    xTicks: ago,
    series: [...models].map((model) => ({
      name: model,
      key: `queue-${model}`,
      axis: "left",
      dots: false,
      points: samples.map((s) => ({ x: s.time, y: s.queues.get(model) || 0 })),
    })),
  });
  const body = clear(byId("throughput-body"));
  const latest = new Map([...rates()].map(([device, points]) => [device, points[points.length - 1].y]));
  for (const [device, rate] of latest) body.append(el("tr", {}, el("th", { scope: "row" }, bdi(device)), el("td", { class: "number" }, rate.toFixed(1))));
}

async function sample() {
  try {
    record(await api.throughput());
    draw();
    say(byId("throughput-status"), `Sampled every ${SAMPLE_SECONDS} s since this page opened; ${samples.length} samples.`);
  } catch (error) {
    say(byId("throughput-status"), errorParts(error), "error");
  }
}

/** Samples from now on (``on``), or stops. */
export function sampleThroughput(on) {
  if (on && timer === null) {
    sample();
    timer = setInterval(sample, SAMPLE_SECONDS * 1000);
  } else if (!on && timer !== null) {
    clearInterval(timer);
    timer = null;
  }
}
