// The jobs list: status, model, method, progress with ETA, times; filters, pages, live.

import { get, path, sleep } from "../api.js";
import { TERMINAL, h, methodName, pagerControls, progressBar, replace, statusBadge,
  timeElement } from "../dom.js";

const STATUSES = ["queued", "running", "paused", "succeeded", "failed", "cancelled"];
const PAGE = 20; // jobs a page; #/jobs?limit=N changes it
const POLL_MS = 3000;

export async function jobsPage(main, { query }, signal) {
  const state = {
    status: query.get("status") || "",
    model: query.get("model") || "",
    limit: Math.min(100, Math.max(1, Number(query.get("limit")) || PAGE)),
    cursors: [], // the `after` of each page before this one
    after: null,
    picked: new Set(),
  };
  const models = await get("/models", { signal }).catch(() => ({ data: [] }));
  const statusSelect = select("filter-status", "Status", STATUSES, state.status);
  const modelSelect = select("filter-model", "Model", models.data.map((m) => m.id), state.model);
  const compare = h("a", { class: "button", href: "#/compare", "aria-disabled": "true",
    onclick: (event) => { if (state.picked.size < 2) event.preventDefault(); } }, "Compare selected");
  const body = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  const table = h("table", { class: "jobs" },
    h("caption", { class: "visually-hidden" }, "Your team's jobs, newest first"),
    h("thead", {}, h("tr", {},
      ["", "Job", "Status", "Model", "Method", "Progress", "Created", "Finished"]
        .map((name) => h("th", { scope: "col" }, name || h("span", { class: "visually-hidden" }, "Select"))))),
    body);

  const onFilter = () => {
    state.status = statusSelect.querySelector("select").value;
    state.model = modelSelect.querySelector("select").value;
    state.cursors = [];
    state.after = null;
    const params = new URLSearchParams();
    if (state.status) params.set("status", state.status);
    if (state.model) params.set("model", state.model);
    if (state.limit !== PAGE) params.set("limit", state.limit);
    history.replaceState(null, "", `#/jobs${params.size ? `?${params}` : ""}`);
    refresh();
  };
  statusSelect.addEventListener("change", onFilter);
  modelSelect.addEventListener("change", onFilter);

  replace(main,
    h("div", { class: "heading" }, h("h1", {}, "Jobs"),
      h("a", { class: "button primary", href: "#/new" }, "New job")),
    h("div", { class: "toolbar" }, statusSelect, modelSelect, compare),
    h("div", { class: "table-wrap" }, table), pager);

  let page = { data: [], has_more: false };
  async function refresh() {
    page = await get(path("/jobs", { limit: state.limit, after: state.after, status: state.status,
      model: state.model }), { signal });
    drawRows();
    drawPager();
  }

  function drawRows() {
    if (!page.data.length) {
      replace(body, h("tr", {}, h("td", { colspan: 8, class: "empty" },
        state.status || state.model ? "No jobs match these filters." : "No jobs yet. ",
        state.status || state.model ? null : h("a", { href: "#/new" }, "Start one."))));
      return;
    }
    replace(body, page.data.map((job) => h("tr", {},
      h("td", {}, h("input", { type: "checkbox", "aria-label": `select ${job.id} to compare`,
        checked: state.picked.has(job.id),
        onchange: (e) => { e.target.checked ? state.picked.add(job.id) : state.picked.delete(job.id); drawCompare(); } })),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id),
        job.suffix ? h("div", { class: "muted" }, job.suffix) : null),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, job.model, h("div", { class: "muted" }, job.task)),
      h("td", {}, methodName(job.method)),
      h("td", {}, progressBar(job)),
      h("td", {}, timeElement(job.created_at)),
      h("td", {}, timeElement(job.finished_at)))));
  }

  function drawCompare() {
    const ids = [...state.picked];
    compare.setAttribute("href", `#/compare?jobs=${ids.map(encodeURIComponent).join(",")}`);
    compare.setAttribute("aria-disabled", ids.length >= 2 ? "false" : "true");
    compare.textContent = `Compare selected (${ids.length})`;
  }

  function drawPager() {
    replace(pager, pagerControls(state, page, refresh));
  }

  drawCompare();
  await refresh();
  // Live: the page is read again while any job on it can still change.
  (async () => {
    while (!signal.aborted) {
      await sleep(POLL_MS, signal);
      if (signal.aborted || document.hidden) continue;
      if (page.data.length && page.data.every((job) => TERMINAL.has(job.status)) && state.cursors.length) continue;
      await refresh().catch(() => {});
    }
  })();
}

function select(id, label, values, chosen) {
  return h("div", { class: "field inline" },
    h("label", { for: id }, label),
    h("select", { id }, h("option", { value: "" }, "all"),
      values.map((value) => h("option", { value, selected: value === chosen }, value))));
}
