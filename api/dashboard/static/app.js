// The dashboard's shell: sign-in, the navigation, and a page per address (#/jobs, ...).
// Each page is a function (main, params, signal) that draws into `main` and stops its
// polling and streams when `signal` aborts (the user went to another page).

import { ApiError, key, keyWorks, whenUnauthorized } from "./api.js";
import { announce, errorBox, h, replace } from "./dom.js";
import { comparePage } from "./pages/compare.js";
import { filesPage } from "./pages/files.js";
import { jobPage } from "./pages/job.js";
import { jobsPage } from "./pages/jobs.js";
import { newJobPage } from "./pages/new_job.js";

const ROUTES = [
  [/^\/jobs\/([^/]+)$/, (m) => ({ page: jobPage, params: { id: decodeURIComponent(m[1]) } })],
  [/^\/jobs$/, () => ({ page: jobsPage, params: {} })],
  [/^\/compare$/, () => ({ page: comparePage, params: {} })],
  [/^\/files$/, () => ({ page: filesPage, params: {} })],
  [/^\/new$/, () => ({ page: newJobPage, params: {} })],
];

let current = null; // the AbortController of the page on screen

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/jobs";
  const [pathPart, queryPart = ""] = raw.split("?");
  return { path: pathPart, query: new URLSearchParams(queryPart) };
}

async function render() {
  current?.abort();
  current = new AbortController();
  const main = document.getElementById("main");
  const signedIn = Boolean(key.get());
  document.getElementById("nav").hidden = !signedIn;
  document.getElementById("who").hidden = !signedIn;
  if (!signedIn) {
    signIn(main);
    return;
  }
  const { path, query } = parseHash();
  const route = ROUTES.map(([pattern, make]) => [path.match(pattern), make])
    .find(([match]) => match);
  for (const link of document.querySelectorAll("#nav a")) {
    const here = path === link.getAttribute("href").slice(1)
      || (path.startsWith("/jobs/") && link.getAttribute("href") === "#/jobs");
    if (here) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (!route) {
    replace(main, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to jobs")));
    return;
  }
  const { page, params } = route[1](route[0]);
  replace(main);
  try {
    await page(main, { ...params, query }, current.signal);
  } catch (error) {
    if (error.name === "AbortError" || current.signal.aborted) return;
    replace(main, errorBox(error instanceof ApiError ? error : { title: "Error", message: String(error), errors: [] }));
  }
  if (!current.signal.aborted) {
    const heading = main.querySelector("h1");
    if (heading) document.title = `${heading.textContent} · tuneq`;
  }
}

function signIn(main) {
  document.title = "Sign in · tuneq";
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off",
    spellcheck: "false", required: true, "aria-describedby": "key-help" });
  const message = h("div", { "aria-live": "assertive" });
  const form = h("form", { class: "card narrow", onsubmit: async (event) => {
    event.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    try {
      if (!(await keyWorks(value))) {
        replace(message, errorBox({ title: "Key refused",
          message: "This API key is not valid (mistyped, or revoked).", errors: [] }));
        input.select();
        return;
      }
    } catch (error) {
      replace(message, errorBox(error));
      return;
    }
    key.set(value);
    document.getElementById("who-label").textContent = `key ${value.slice(0, 12)}…`;
    announce("Signed in");
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    else render();
  } },
  h("h1", {}, "Sign in"),
  h("p", { id: "key-help" }, "Paste an API key of your team. It is kept for this tab only, ",
    "and forgotten when you sign out or close the tab."),
  h("label", { for: "api-key" }, "API key"), input,
  h("button", { type: "submit" }, "Sign in"), message);
  replace(main, form);
  input.focus();
}

function signOut() {
  key.forget();
  current?.abort();
  announce("Signed out");
  location.hash = "#/jobs";
  render();
}

whenUnauthorized(() => {
  if (!key.get()) return;
  key.forget();
  render();
});
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", () => {
  render();
  document.getElementById("main").focus({ preventScroll: true });
});
if (key.get()) document.getElementById("who-label").textContent = `key ${key.get().slice(0, 12)}…`;
render();
