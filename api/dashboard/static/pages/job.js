// One job: its status and progress, live curves, the event log (SSE, polling where the
// stream is missing), the settings as resolved, the estimate against the actual, its
// error, the steering buttons, its downloads, and a box to try it.

import { ApiError, followEvents, get, path, post, request, sleep } from "../api.js";
import { TERMINAL, announce, duration, errorBox, h, number, progressBar, replace,
  statusBadge, timeElement } from "../dom.js";
import { chartsOf, downloadsOf, estimateOf, settingsOf } from "./job_parts.js";
import { resultsOf } from "./job_results.js";
import { tryItBox } from "./try_it.js";

const STEERING = {
  cancel: (status) => !TERMINAL.has(status),
  pause: (status) => status === "queued" || status === "running",
  resume: (status) => status === "paused",
};

export async function jobPage(main, { id }, signal) {
  const base = `/jobs/${encodeURIComponent(id)}`;
  const view = { job: null, metrics: { train: [], eval: [] }, checkpoints: [], artifacts: [] };
  const slots = Object.fromEntries(["head", "summary", "error", "results", "charts", "log",
    "downloads", "settings", "estimate", "tryit"].map((name) => [name, h("div", { class: `slot-${name}` })]));
  const showMetricEvents = h("input", { type: "checkbox", id: "show-metrics" });
  const log = h("ol", { class: "log", role: "log", "aria-label": "Event log", tabindex: 0 });

  async function loadJob() {
    view.job = await get(base, { signal });
    if (view.trainingFormat === undefined) { // how to try it follows the data's format
      const file = await get(`/files/${encodeURIComponent(view.job.training_file)}`, { signal })
        .catch(() => null); // deleted since: a chat is the default
      view.trainingFormat = file?.format ?? null;
    }
    drawJob();
  }
  async function loadMetrics() {
    view.metrics = await get(`${base}/metrics`, { signal });
    replace(slots.charts, chartsOf(view));
    replace(slots.results, resultsOf(view));
  }
  async function loadFiles() {
    const [checkpoints, artifacts] = await Promise.all([
      get(`${base}/checkpoints`, { signal }), get(`${base}/artifacts`, { signal })]);
    view.checkpoints = checkpoints.data;
    view.artifacts = artifacts.data;
    replace(slots.downloads, downloadsOf(view, base));
    // Redrawn when there is something new to try with (a conversation in it starts over).
    const tryable = `${view.job.status === "succeeded"}:${view.checkpoints.length}`;
    if (slots.tryit.dataset.tryable !== tryable) {
      slots.tryit.dataset.tryable = tryable;
      replace(slots.tryit, tryItBox(view, base));
    }
  }

  function drawJob() {
    const job = view.job;
    replace(slots.head,
      h("div", { class: "heading" },
        h("h1", {}, job.id),
        statusBadge(job.status),
        h("div", { class: "actions" }, Object.keys(STEERING).filter((a) => STEERING[a](job.status))
          .map((action) => h("button", { type: "button", class: action === "cancel" ? "danger" : "",
            onclick: () => steer(action) }, action[0].toUpperCase() + action.slice(1))),
        TERMINAL.has(job.status) ? h("button", { type: "button", class: "danger", onclick: remove },
          "Delete") : null)),
      job.suffix ? h("p", { class: "muted" }, job.suffix) : null);
    const progress = job.progress || {};
    replace(slots.summary, h("dl", { class: "facts" },
      fact("Model", job.model), fact("Task", job.task), fact("Method", job.method?.type),
      fact("Progress", progressBar(job)),
      fact("Step", progress.step != null ? `${progress.step} of ${progress.total_steps}` : "–"),
      fact("Epoch", number(progress.epoch, 3)),
      fact(job.task === "image_classification" ? "Trained images" : "Trained tokens",
        job.trained_tokens != null ? job.trained_tokens.toLocaleString() : "–"),
      fact("Attempt", job.max_attempts ? `${job.attempt} of ${job.max_attempts}` : job.attempt),
      job.max_runtime_seconds != null ? fact("Time limit", duration(job.max_runtime_seconds)) : null,
      fact("Created", timeElement(job.created_at)),
      fact("Started", timeElement(job.started_at)),
      fact("Finished", timeElement(job.finished_at)),
      job.result?.wall_seconds != null ? fact("Wall time", duration(job.result.wall_seconds)) : null,
      Object.keys(job.metadata || {}).length ? fact("Metadata", h("ul", { class: "plain" },
        Object.entries(job.metadata).map(([name, value]) => h("li", {}, `${name}: ${value}`)))) : null));
    replace(slots.error, job.error ? errorBox({ title: `The job ${job.status}`, code: job.error.code,
      message: job.error.message || "", errors: job.error.errors || [] }) : null);
    replace(slots.settings, settingsOf(job));
    replace(slots.estimate, estimateOf(job));
  }

  async function remove() {
    const sure = confirm(`Delete ${id}? Its adapter, every checkpoint, its diagnostics, `
      + "events and metrics go too; this cannot be undone.");
    if (!sure) return;
    try {
      await request("DELETE", base, { signal });
      announce(`Job ${id} deleted`);
      location.hash = "#/jobs";
    } catch (error) {
      replace(slots.error, errorBox(error));
    }
  }

  async function steer(action) {
    try {
      view.job = await post(`${base}/${action}`, undefined, { signal });
      announce(`Job ${action} requested`);
      drawJob();
    } catch (error) {
      replace(slots.error, errorBox(error));
    }
  }

  function addEvent(event) {
    if (event.type === "metrics") {
      const point = event.data;
      const series = "train_loss" in point ? view.metrics.train : view.metrics.eval;
      const last = series[series.length - 1];
      if (!last || point.step > last.step) series.push(point);
      else if (point.step === last.step) series[series.length - 1] = point;
    }
    log.append(h("li", { class: `level-${event.level} type-${event.type}` },
      timeElement(event.created_at), " ", h("span", { class: "message" }, event.message)));
    if (log.children.length > 2000) log.firstElementChild.remove();
    log.scrollTop = log.scrollHeight;
  }

  showMetricEvents.addEventListener("change", () => {
    log.classList.toggle("with-metrics", showMetricEvents.checked);
  });

  replace(main, slots.head, slots.error, slots.summary, slots.results, slots.charts,
    h("section", { "aria-labelledby": "log-title" },
      h("div", { class: "heading" }, h("h2", { id: "log-title" }, "Events"),
        h("div", { class: "field inline" }, showMetricEvents,
          h("label", { for: "show-metrics" }, "show metrics events"))),
      log),
    slots.tryit, slots.downloads, slots.estimate, slots.settings);

  await loadJob();
  await Promise.all([loadMetrics(), loadFiles()]);
  follow(view, { base, signal, addEvent, loadJob, loadMetrics, loadFiles, charts: slots.charts });
}

function fact(term, value) {
  return h("div", {}, h("dt", {}, term), h("dd", {}, value ?? "–"));
}

// Keep the page current: the event stream where there is one, else polling. Redraws are
// throttled: a fast job sends several events a second.
async function follow(view, { base, signal, addEvent, loadJob, loadMetrics, loadFiles, charts }) {
  let dirty = { job: false, charts: false, files: false };
  const flush = async () => {
    const todo = dirty;
    dirty = { job: false, charts: false, files: false };
    if (todo.job) await loadJob().catch(() => {});
    if (todo.charts) replace(charts, chartsOf(view));
    if (todo.files) await loadFiles().catch(() => {});
  };
  const ticker = (async () => {
    while (!signal.aborted) {
      await sleep(1500, signal);
      if (!signal.aborted) await flush();
    }
  })();
  try {
    await followEvents(view.job.id, null, {
      signal,
      onEvent: (event) => {
        addEvent(event);
        dirty.job = true;
        if (event.type === "metrics") dirty.charts = true;
        if (/checkpoint/.test(event.message) || event.type !== "metrics") dirty.files = true;
      },
      onEnd: (job) => { view.job = job; dirty = { job: true, charts: false, files: true }; },
    });
    if (!signal.aborted) {
      await flush();
      await loadMetrics();
    }
  } catch (error) {
    if (!(error instanceof ApiError) || signal.aborted) return;
    // No stream here: poll the events, the job and its metrics until it ends.
    let after = null;
    for (;;) {
      const page = await get(path(`${base}/events`, { after, limit: 100 }), { signal }).catch(() => null);
      for (const event of page?.data || []) {
        addEvent(event);
        after = event.id;
      }
      if (page?.has_more) continue;
      await Promise.all([loadJob(), loadMetrics(), loadFiles()]).catch(() => {});
      if (signal.aborted || TERMINAL.has(view.job.status)) break;
      await sleep(3000, signal);
    }
  }
  await ticker;
}
