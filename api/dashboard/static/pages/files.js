// Files: the team's uploads with their validation reports, and an upload form that shows
// the line-numbered errors of a refused file.

import { download, get, path, request } from "../api.js";
import { announce, bytes, errorBox, h, number, pagerControls, replace, timeElement } from "../dom.js";

const PAGE = 20;

export async function filesPage(main, _params, signal) {
  const state = { cursors: [], after: null };
  const body = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  const outcome = h("div", { "aria-live": "polite" });
  const input = h("input", { id: "upload-file", type: "file", required: true,
    accept: ".jsonl,.json,.csv,.txt,.zip,.tar.gz,.tgz,application/json,text/csv,application/zip,application/gzip" });
  const submit = h("button", { type: "submit", class: "primary" }, "Upload");
  const form = h("form", { class: "card", onsubmit: async (event) => {
    event.preventDefault();
    const file = input.files[0];
    if (!file) return;
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", file, file.name);
    submit.disabled = true;
    replace(outcome, h("p", { class: "muted" }, `Uploading ${file.name}…`));
    try {
      const uploaded = await request("POST", "/files", { body: data, signal });
      replace(outcome, h("p", { class: "ok", role: "status" }, `${uploaded.filename} accepted as `,
        h("code", {}, uploaded.id), `: ${uploaded.examples} examples, format ${uploaded.format}.`));
      announce(`${uploaded.filename} uploaded`);
      form.reset();
      state.cursors = [];
      state.after = null;
      await refresh();
    } catch (error) {
      replace(outcome, refusal(file.name, error));
    } finally {
      submit.disabled = false;
    }
  } },
  h("h2", {}, "Upload a dataset"),
  h("p", { class: "muted" }, "JSONL (chat, prompt/completion, text, classification, tokens and tags, ",
    "preference pairs) or CSV for classification; images as a .zip or .tar.gz of label folders ",
    "(label/image.png) or JSONL with base64 images. Each line, or each image, is checked as it arrives."),
  h("div", { class: "field" }, h("label", { for: "upload-file" }, "File"), input),
  h("div", { class: "buttons" }, submit), outcome);

  replace(main, h("h1", {}, "Files"), form,
    h("h2", {}, "Your files"),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["File", "Format", "Examples", "Size", "Uploaded", "Report", ""]
        .map((name) => h("th", { scope: "col" }, name)))), body)), pager);

  async function refresh() {
    const page = await get(path("/files", { limit: PAGE, after: state.after }), { signal });
    replace(body, page.data.length ? page.data.map(fileRow)
      : h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No files yet.")));
    replace(pager, pagerControls(state, page, refresh));
  }
  await refresh();
}

function fileRow(file) {
  return h("tr", {},
    h("th", { scope: "row" }, file.filename, h("div", { class: "muted" }, h("code", {}, file.id))),
    h("td", {}, file.format), h("td", {}, number(file.examples)), h("td", {}, bytes(file.bytes)),
    h("td", {}, timeElement(file.created_at)),
    h("td", {}, h("details", {}, h("summary", {}, "report"), reportOf(file.report))),
    h("td", {}, h("button", { type: "button", class: "quiet", onclick: () =>
      download(`/files/${encodeURIComponent(file.id)}/content`, file.filename) }, "Download")));
}

function reportOf(report) {
  return h("dl", { class: "report" }, Object.entries(report || {}).map(([name, value]) =>
    h("div", {}, h("dt", {}, name.replace(/_/g, " ")),
      h("dd", {}, typeof value === "object" && value !== null ? JSON.stringify(value) : String(value)))));
}

function refusal(filename, error) {
  const more = error.problem?.total_errors;
  const box = errorBox({ ...error, title: `${filename} was refused`, message: error.message,
    errors: error.errors });
  if (more && more > error.errors.length) {
    box.append(h("p", { class: "muted" }, `${more} errors in all; the first ${error.errors.length} are shown.`));
  }
  return box;
}
