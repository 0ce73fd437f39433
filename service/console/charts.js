// Small SVG line charts: a left axis, an optional right axis (0 to 1, for accuracy), a
// legend. Each point is a <circle class="point" data-series="..."> with a <title> that
// says its values, so the figures can be read by hovering, by a screen reader, or by a test.
// An axis of a whole-number quantity (epochs, images queued) has whole-number ticks only.

import { bdi, el, svg, clear } from "./dom.js";

const WIDTH = 640;
const HEIGHT = 260;
const PAD = { left: 56, right: 52, top: 14, bottom: 40 };
const COLOURS = ["#1f6fd1", "#d1571f", "#1f9d55", "#8e44ad", "#b8860b", "#c0392b", "#16a085", "#555"];

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function tickValues(max, count = 4) {
  return Array.from({ length: count + 1 }, (_, i) => (max * i) / count);
}

/** A whole step of 1, 2 or 5 times a power of ten, at least ``raw``. */
export function wholeStep(raw) {
  if (!(raw > 1)) return 1;
  const power = 10 ** Math.floor(Math.log10(raw));
  for (const multiple of [1, 2, 5]) if (raw <= multiple * power) return multiple * power;
  return 10 * power;
}

/** The top and ticks of an axis from 0 that shows ``max``: about four steps, whole ones when
 * ``whole`` (the quantity is a count). */
export function axisTicks(max, whole = false) {
  if (!whole) {
    const top = niceMax(max);
    return { top, ticks: tickValues(top) };
  }
  const step = wholeStep((max > 0 ? max : 0) / 4);
  const top = Math.max(step, step * Math.ceil(max / step));
  return { top, ticks: Array.from({ length: top / step + 1 }, (_, i) => i * step) };
}

/** A tick or a value, short: 3 significant digits ("0.25", "1.2e-7", "1500"), never a long run of digits. */
export function label(value) {
  if (value === 0) return "0";
  if (Math.abs(value) >= 100) return value.toFixed(0);
  return String(Number(value.toPrecision(3)));
}

/**
 * Draws into ``container`` (its children are replaced).
 * spec: { title, xLabel, leftLabel, leftWhole? (a count: whole ticks), rightLabel?, xMin?, xMax?,
 *         xTickValues?, xTicks?(value)->text,
 *         series: [{ name, key, axis: "left"|"right", points: [{x, y}], lines?: true }] }
 */
export function lineChart(container, spec) {
  clear(container);
  const plotted = spec.series.map((s, i) => ({
    ...s,
    colour: COLOURS[i % COLOURS.length],
    points: s.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y)),
  }));
  const all = plotted.flatMap((s) => s.points);
  const xs = all.map((p) => p.x);
  const xMin = spec.xMin ?? (xs.length ? Math.min(...xs) : 0);
  const xMax = Math.max(spec.xMax ?? (xs.length ? Math.max(...xs) : 1), xMin + 1e-9);
  const left = axisTicks(Math.max(0, ...plotted.filter((s) => s.axis !== "right").flatMap((s) => s.points.map((p) => p.y))), spec.leftWhole);
  const leftMax = left.top;
  const rightMax = 1;
  const width = WIDTH - PAD.left - PAD.right;
  const height = HEIGHT - PAD.top - PAD.bottom;
  const x = (value) => PAD.left + ((value - xMin) / (xMax - xMin)) * width;
  const y = (value, axis) => PAD.top + height - (Math.max(0, value) / (axis === "right" ? rightMax : leftMax)) * height;

  const chart = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    class: "chart",
    "aria-label": spec.title,
  });
  chart.append(svg("title", {}, spec.title));
  const grid = svg("g", { class: "grid" });
  for (const value of left.ticks) {
    const at = y(value, "left");
    grid.append(svg("line", { x1: PAD.left, x2: PAD.left + width, y1: at, y2: at }));
    grid.append(svg("text", { x: PAD.left - 6, y: at + 4, "text-anchor": "end" }, label(value)));
  }
  if (spec.rightLabel) {
    for (const value of tickValues(rightMax)) {
      grid.append(svg("text", { x: PAD.left + width + 6, y: y(value, "right") + 4 }, `${Math.round(value * 100)}%`));
    }
  }
  const xTicks = spec.xTickValues ?? tickValues(xMax - xMin).map((v) => v + xMin);
  for (const value of xTicks) {
    grid.append(
      svg("text", { x: x(value), y: PAD.top + height + 16, "text-anchor": "middle" }, spec.xTicks ? spec.xTicks(value) : label(value)),
    );
  }
  grid.append(svg("text", { x: PAD.left + width / 2, y: HEIGHT - 6, "text-anchor": "middle", class: "axis-label" }, spec.xLabel));
  grid.append(
    svg("text", { x: 12, y: PAD.top + height / 2, transform: `rotate(-90 12 ${PAD.top + height / 2})`, "text-anchor": "middle", class: "axis-label" }, spec.leftLabel),
  );
  if (spec.rightLabel) {
    const rx = WIDTH - 8;
    grid.append(
      svg("text", { x: rx, y: PAD.top + height / 2, transform: `rotate(90 ${rx} ${PAD.top + height / 2})`, "text-anchor": "middle", class: "axis-label" }, spec.rightLabel),
    );
  }
  grid.append(svg("rect", { x: PAD.left, y: PAD.top, width, height, class: "frame" }));
  chart.append(grid);

  for (const series of plotted) {
    const group = svg("g", { class: "series", "data-series": series.key });
    if (series.points.length > 1) {
      const path = series.points.map((p, i) => `${i ? "L" : "M"}${x(p.x).toFixed(1)},${y(p.y, series.axis).toFixed(1)}`).join(" ");
      group.append(svg("path", { d: path, stroke: series.colour, fill: "none", "stroke-width": 2 }));
    }
    if (series.dots !== false) {
      for (const p of series.points) {
        const dot = svg("circle", { cx: x(p.x), cy: y(p.y, series.axis), r: 3.5, fill: series.colour, class: "point", "data-series": series.key });
        dot.append(svg("title", {}, `${series.name}: ${p.label ?? label(p.y)} at ${spec.xTicks ? spec.xTicks(p.x) : p.x}`));
        group.append(dot);
      }
    }
    chart.append(group);
  }

  const legend = el("ul", { class: "legend" });
  for (const series of plotted) {
    const swatch = el("span", { class: "swatch", "aria-hidden": "true" });
    swatch.style.background = series.colour; // a CSSOM property, which CSP's style-src allows
    legend.append(el("li", {}, swatch, bdi(series.name), series.axis === "right" ? " (right axis)" : ""));
  }
  container.append(chart, legend);
  return chart;
}

/** The chart of a fine-tuning job: train loss, validation loss (left), validation accuracy (right). */
export function trainingChart(container, points, epochs) {
  const series = (name, key, axis, pick) => ({
    name,
    key,
    axis,
    points: points.map((p) => ({ x: p.epoch, y: pick(p) })),
  });
  const hasValidation = points.some((p) => p.validationLoss > 0);
  const hasAccuracy = points.some((p) => p.validationAccuracy > 0);
  return lineChart(container, {
    title: `Training curve: ${points.length} of ${epochs || points.length} epochs`,
    xLabel: "epoch",
    leftLabel: "loss",
    rightLabel: hasAccuracy ? "validation accuracy" : undefined,
    xMin: 1,
    xMax: Math.max(epochs || 1, ...points.map((p) => p.epoch), 2),
    xTickValues: epochTicks(Math.max(epochs || 1, ...points.map((p) => p.epoch))),
    xTicks: (value) => String(Math.round(value)),
    series: [
      series("train loss", "train_loss", "left", (p) => p.trainLoss),
      ...(hasValidation ? [series("validation loss", "validation_loss", "left", (p) => p.validationLoss)] : []),
      ...(hasAccuracy ? [series("validation accuracy", "validation_accuracy", "right", (p) => p.validationAccuracy)] : []),
    ],
  });
}

/** Whole epochs: 1, then multiples of a whole step (1, 2, 5, 10, 20...), at most about 10 ticks. */
export function epochTicks(epochs) {
  const last = Math.max(1, Math.floor(epochs));
  const step = wholeStep(last / 10);
  const ticks = [1];
  for (let e = step; e <= last; e += step) if (e > 1) ticks.push(e);
  return ticks;
}
