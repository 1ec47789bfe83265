// The parts of a job's page drawn from its data alone: curves, downloads, the estimate
// against the actual, the settings as resolved.

import { download } from "../api.js";
import { bytes, duration, errorBox, h, number, timeElement } from "../dom.js";
import { PALETTE, lineChart, smoothed } from "../chart.js";

// Evaluation scores between 0 and 1, drawn together (the loss has its own chart).
export const SCORES = ["accuracy", "macro_f1", "entity_f1", "token_accuracy",
  "eval_token_accuracy", "eval_reward_accuracy"];

export function seriesOf(points, name) {
  return points.filter((p) => Number.isFinite(p[name])).map((p) => [p.step, p[name]]);
}

export function bestMark(job) {
  const step = job.result?.best_step;
  return step != null ? [{ x: step, label: `best (step ${step})` }] : [];
}

export function chartsOf({ job, metrics }) {
  const marks = bestMark(job);
  // The whole job's steps on every chart: a running job's curves grow toward the right edge.
  const total = job.result?.steps ?? job.progress?.total_steps;
  const xRange = total ? [0, total] : null;
  const scores = SCORES.filter((name) => metrics.eval.some((p) => Number.isFinite(p[name])));
  return h("section", { class: "charts", "aria-labelledby": "curves-title" },
    h("h2", { id: "curves-title" }, "Curves"),
    h("div", { class: "chart-grid" },
      lineChart({ title: "Loss", yLabel: "loss", marks, xRange, series: lossSeries(metrics) }),
      lineChart({ title: "Learning rate", yLabel: "rate", xRange,
        series: [{ name: "learning rate", points: seriesOf(metrics.train, "learning_rate") }] }),
      scores.length ? lineChart({ title: "Evaluation scores", yLabel: "score", marks, xRange, yRange: [0, 1],
        series: scores.map((name) => ({ name: name.replace(/^eval_/, "").replace(/_/g, " "),
          points: seriesOf(metrics.eval, name) })) }) : null));
}

// Many noisy steps: the raw training loss faint, and its moving average drawn over it.
function lossSeries(metrics) {
  const train = seriesOf(metrics.train, "train_loss");
  const evaluation = { name: "evaluation loss", points: seriesOf(metrics.eval, "eval_loss") };
  if (train.length < 50) return [{ name: "training loss", points: train }, evaluation];
  return [{ name: "training loss, smoothed", points: smoothed(train) }, evaluation,
    { name: "training loss", points: train, faint: true, color: PALETTE[0] }];
}

export function downloadsOf({ job, checkpoints, artifacts }, base) {
  const byName = new Map(artifacts.map((a) => [a.name, a]));
  const message = h("div", { "aria-live": "polite" });
  const button = (artifact, label) => h("button", { type: "button", onclick: async () => {
    try {
      await download(`${base}/artifacts/${encodeURIComponent(artifact.name)}`, `${job.id}-${artifact.name}`);
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  } }, label);
  const rows = [];
  for (const artifact of artifacts.filter((a) => a.kind !== "checkpoint")) {
    rows.push(h("tr", {}, h("th", { scope: "row" }, artifact.name), h("td", {}, artifact.kind),
      h("td", {}, "–"), h("td", {}, bytes(artifact.bytes)), h("td", {}, timeElement(artifact.created_at)),
      h("td", {}, button(artifact, `Download ${artifact.name}`))));
  }
  for (const checkpoint of checkpoints) {
    const artifact = byName.get(checkpoint.artifact);
    const loss = checkpoint.metrics.eval_loss ?? checkpoint.metrics.train_loss;
    rows.push(h("tr", {}, h("th", { scope: "row" }, `checkpoint, step ${checkpoint.step}`),
      h("td", {}, "checkpoint"),
      h("td", {}, loss != null ? `loss ${number(loss)}` : "–"),
      h("td", {}, artifact ? bytes(artifact.bytes) : "–"),
      h("td", {}, timeElement(checkpoint.created_at)),
      h("td", {}, artifact ? button(artifact, `Download step ${checkpoint.step}`) : "–")));
  }
  return h("section", { "aria-labelledby": "downloads-title" },
    h("h2", { id: "downloads-title" }, "Downloads"),
    rows.length ? h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Artifact", "Kind", "Metric", "Size", "Saved", ""]
        .map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, rows))) : h("p", { class: "muted" }, "Nothing to download yet."),
    message);
}

export function estimateOf(job) {
  const estimate = job.estimate;
  if (!estimate) return null;
  const timings = job.timings || {};
  const phases = estimate.seconds_by_phase || {};
  const actual = (phase) => timings[`${phase}_seconds`];
  const row = (label, guess, real) => h("tr", {}, h("th", { scope: "row" }, label),
    h("td", {}, guess), h("td", {}, real));
  return h("section", { "aria-labelledby": "estimate-title" },
    h("h2", { id: "estimate-title" }, "Estimate and actual"),
    h("div", { class: "table-wrap" }, h("table", { class: "compact" },
      h("thead", {}, h("tr", {}, ["", "Estimated", "Actual"].map((n) => h("th", { scope: "col" }, n)))),
      h("tbody", {},
        Object.keys(phases).map((phase) => row(phase, duration(phases[phase]),
          duration(actual(phase)))),
        row("total", duration(estimate.estimated_seconds), duration(timings.wall_seconds)),
        row(`trained ${estimate.unit || "tokens"}`,
          number(estimate.unit === "images" ? estimate.trained_images : estimate.trained_tokens),
          number(job.trained_tokens)),
        row("steps", number(estimate.total_steps), number(job.result?.steps ?? job.progress?.step)),
        row("evaluations", number(estimate.evaluations), number(timings.evaluations))))),
    estimate.basis ? h("p", { class: "muted" }, `Speed from: ${estimate.basis}`) : null);
}

export function settingsOf(job) {
  const values = { ...Object.fromEntries(Object.entries(job.method || {}).map(([k, v]) => [`method.${k}`, v])),
    ...job.hyperparameters };
  return h("section", { "aria-labelledby": "settings-title" },
    h("h2", { id: "settings-title" }, "Settings, as resolved"),
    h("dl", { class: "settings-grid" }, Object.entries(values).map(([name, value]) =>
      h("div", {}, h("dt", {}, name),
        h("dd", {}, h("code", {}, typeof value === "object" ? JSON.stringify(value) : String(value)))))),
    h("p", {}, "Files: ", h("code", {}, job.training_file),
      job.validation_file ? [" (validation ", h("code", {}, job.validation_file), ")"] : null));
}
