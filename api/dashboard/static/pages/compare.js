// Compare: pick jobs and overlay their curves (what a sweep's user looks at next).

import { get, path } from "../api.js";
import { h, methodName, number, replace, statusBadge } from "../dom.js";
import { lineChart } from "../chart.js";
import { SCORES, seriesOf } from "./job_parts.js";

const CURVES = ["eval_loss", "train_loss", ...SCORES, "learning_rate"];

export async function comparePage(main, { query }, signal) {
  const picked = new Set((query.get("jobs") || "").split(",").filter(Boolean));
  const recent = await get(path("/jobs", { limit: 50 }), { signal });
  const known = new Map(recent.data.map((job) => [job.id, job]));
  for (const id of picked) {
    if (!known.has(id)) known.set(id, await get(`/jobs/${encodeURIComponent(id)}`, { signal }));
  }
  const metrics = new Map();
  const curve = h("select", { id: "compare-curve" });
  const chart = h("div", { class: "compare-chart" });
  const summary = h("div", { class: "table-wrap" });

  const picker = h("fieldset", { class: "picker" }, h("legend", {}, "Jobs"),
    [...known.values()].map((job) => h("div", { class: "field inline" },
      h("input", { type: "checkbox", id: `pick-${job.id}`, checked: picked.has(job.id),
        onchange: (event) => {
          event.target.checked ? picked.add(job.id) : picked.delete(job.id);
          history.replaceState(null, "", `#/compare?jobs=${[...picked].map(encodeURIComponent).join(",")}`);
          draw();
        } }),
      h("label", { for: `pick-${job.id}` }, `${job.id}${job.suffix ? ` (${job.suffix})` : ""} · `,
        `${job.model} · ${methodName(job.method)} · ${job.status}`))));

  async function draw() {
    const ids = [...picked];
    await Promise.all(ids.filter((id) => !metrics.has(id)).map(async (id) => {
      metrics.set(id, await get(`/jobs/${encodeURIComponent(id)}/metrics`, { signal }));
    }));
    const available = CURVES.filter((name) => ids.some((id) =>
      [...metrics.get(id).train, ...metrics.get(id).eval].some((p) => Number.isFinite(p[name]))));
    const chosen = available.includes(curve.value) ? curve.value : available[0] || "eval_loss";
    replace(curve, available.map((name) => h("option", { value: name, selected: name === chosen }, name)));
    const series = ids.map((id) => {
      const job = known.get(id);
      const m = metrics.get(id);
      const points = seriesOf(chosen.startsWith("train") || chosen === "learning_rate" ? m.train : m.eval, chosen);
      return { name: `${id}${job?.suffix ? ` (${job.suffix})` : ""}`, points };
    });
    replace(chart, ids.length ? lineChart({ title: chosen.replace(/_/g, " "), yLabel: chosen, series })
      : h("p", { class: "muted" }, "Pick two jobs or more."));
    replace(summary, ids.length ? h("table", {},
      h("thead", {}, h("tr", {}, ["Job", "Status", "Method", "Learning rate", "Best step", "Best eval loss"]
        .map((n) => h("th", { scope: "col" }, n)))),
      h("tbody", {}, ids.map((id) => {
        const job = known.get(id);
        const losses = metrics.get(id).eval.map((p) => p.eval_loss).filter(Number.isFinite);
        return h("tr", {}, h("th", { scope: "row" }, h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id)),
          h("td", {}, statusBadge(job.status)), h("td", {}, methodName(job.method)),
          h("td", {}, number(job.hyperparameters?.learning_rate)),
          h("td", {}, job.result?.best_step ?? "–"),
          h("td", {}, losses.length ? number(Math.min(...losses)) : "–"));
      }))) : null);
  }
  curve.addEventListener("change", draw);

  replace(main, h("h1", {}, "Compare jobs"), picker,
    h("div", { class: "field inline" }, h("label", { for: "compare-curve" }, "Curve"), curve),
    chart, summary);
  await draw();
}
