// Line charts as SVG, drawn here (no library): several series on shared axes, a marked
// step (the best checkpoint), a legend, and the numbers as a table for screen readers.

import { h, number } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 640;
const HEIGHT = 240;
const PAD = { left: 66, right: 16, top: 12, bottom: 36 };
// Okabe–Ito: told apart by people with colour-vision deficiency; dashes tell them apart too.
export const PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"];
const DASHES = ["", "6 3", "2 3", "8 3 2 3"];

function s(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) element.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      element.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return element;
}

// An exponential moving average of a noisy series (as training dashboards smooth a loss).
export function smoothed(points, weight = 0.9) {
  let average = null;
  return points.map(([x, y]) => {
    average = average === null ? y : weight * average + (1 - weight) * y;
    return [x, average];
  });
}

// About `count` round tick values covering [low, high].
export function ticks(low, high, count = 5) {
  if (!(high > low)) return [low];
  const raw = (high - low) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((v) => v >= raw);
  const values = [];
  for (let v = Math.ceil(low / step) * step; v <= high + step * 1e-9; v += step) {
    values.push(Number(v.toPrecision(12)));
  }
  return values;
}

function extent(values, pad) {
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (low === high) { low -= Math.abs(low) * 0.1 || 1; high += Math.abs(high) * 0.1 || 1; }
  const margin = (high - low) * pad;
  return [low - margin, high + margin];
}

export function lineChart({ title, series, xLabel = "step", yLabel = "", marks = [], xRange = null,
  yRange = null }) {
  const drawn = series.filter((line) => line.points.length);
  const figure = h("figure", { class: "chart" }, h("figcaption", {}, title));
  if (!drawn.length) {
    figure.append(h("p", { class: "muted empty" }, "No points yet."));
    return figure;
  }
  const xs = drawn.flatMap((line) => line.points.map((p) => p[0]));
  const ys = drawn.flatMap((line) => line.points.map((p) => p[1])).filter(Number.isFinite);
  const [x0, x1] = xRange || (Math.min(...xs) === Math.max(...xs) ? [xs[0], xs[0] + 1] : extent(xs, 0));
  const [y0, y1] = yRange || extent(ys, 0.05);
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const X = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
  const Y = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": `${title}: ${drawn.map((l) => l.name).join(", ")} against ${xLabel}` });
  const grid = s("g", { class: "grid" });
  for (const y of ticks(y0, y1, 4)) {
    grid.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: Y(y), y2: Y(y) }),
      s("text", { x: PAD.left - 6, y: Y(y) + 4, "text-anchor": "end" }, number(y, 3)));
  }
  for (const x of ticks(x0, x1, 6).filter(Number.isInteger)) { // steps are whole numbers
    grid.append(s("text", { x: X(x), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" },
      number(x, 4)));
  }
  grid.append(s("text", { x: PAD.left + plotW / 2, y: HEIGHT - 4, "text-anchor": "middle",
    class: "axis-label" }, xLabel));
  if (yLabel) {
    grid.append(s("text", { x: 10, y: PAD.top + plotH / 2, "text-anchor": "middle",
      transform: `rotate(-90 10 ${PAD.top + plotH / 2})`, class: "axis-label" }, yLabel));
  }
  svg.append(grid);
  for (const mark of marks) {
    const left = X(mark.x) > PAD.left + plotW * 0.7; // near the right edge: label on the left
    svg.append(s("g", { class: "mark" },
      s("line", { x1: X(mark.x), x2: X(mark.x), y1: PAD.top, y2: PAD.top + plotH }),
      s("text", { x: X(mark.x) + (left ? -4 : 4), y: PAD.top + 12,
        "text-anchor": left ? "end" : "start" }, mark.label)));
  }
  const faintFirst = [...drawn.entries()].sort(([, a], [, b]) => Number(Boolean(b.faint)) - Number(Boolean(a.faint)));
  faintFirst.forEach(([index, line]) => {
    const color = line.color || PALETTE[index % PALETTE.length];
    const points = line.points.filter((p) => Number.isFinite(p[1]));
    const d = points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`);
    svg.append(s("path", { d: d.join(""), fill: "none", stroke: color, "stroke-width": 2,
      "stroke-dasharray": line.faint ? null : DASHES[index % DASHES.length] || null,
      class: "series", "stroke-opacity": line.faint ? 0.3 : null }));
    if (points.length <= 60 && !line.faint) {
      for (const p of points) {
        svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: color },
          s("title", {}, `${line.name}: ${number(p[1])} at ${xLabel} ${p[0]}`)));
      }
    }
  });
  figure.append(svg, legend(drawn), dataTable(drawn, xLabel));
  return figure;
}

function legend(series) {
  return h("ul", { class: "legend" }, series.map((line, index) => {
    const color = line.color || PALETTE[index % PALETTE.length];
    const swatch = s("svg", { width: 24, height: 10, "aria-hidden": "true" },
      s("line", { x1: 0, x2: 24, y1: 5, y2: 5, stroke: color, "stroke-width": 3,
        "stroke-dasharray": line.faint ? null : DASHES[index % DASHES.length] || null,
        "stroke-opacity": line.faint ? 0.3 : null }));
    return h("li", {}, swatch, line.name);
  }));
}

function dataTable(series, xLabel) {
  const steps = [...new Set(series.flatMap((l) => l.points.map((p) => p[0])))].sort((a, b) => a - b);
  const byStep = series.map((line) => new Map(line.points));
  return h("details", { class: "chart-data" }, h("summary", {}, "Data"),
    h("table", {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, xLabel),
        series.map((l) => h("th", { scope: "col" }, l.name)))),
      h("tbody", {}, steps.map((step) => h("tr", {}, h("th", { scope: "row" }, step),
        byStep.map((map) => h("td", {}, map.has(step) ? number(map.get(step)) : "")))))));
}
