// Building the page: elements from data, with every string put in as a text node, and formats.

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2).toLowerCase(), value);
    } else if (name === "class") {
      element.className = value;
    } else if (value === true) {
      element.setAttribute(name, "");
    } else {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

export function announce(text) {
  const region = document.getElementById("announce");
  region.textContent = "";
  setTimeout(() => { region.textContent = text; }, 50);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = n;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

export function when(seconds) {
  if (!seconds) return "–";
  const date = new Date(seconds * 1000);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function timeElement(seconds) {
  if (!seconds) return "–";
  return h("time", { datetime: new Date(seconds * 1000).toISOString() }, when(seconds));
}

export function number(value, digits = 4) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  if (Number.isInteger(value)) return value.toLocaleString();
  const magnitude = Math.abs(value);
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e6)) return value.toExponential(2);
  return String(Number(value.toPrecision(digits)));
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function progressBar(job) {
  const progress = job.progress || {};
  const percent = job.status === "succeeded" ? 100 : progress.percent || 0;
  const label = `${Math.round(percent)}%`;
  const eta = job.status === "running" && progress.eta_seconds != null
    ? ` · ETA ${duration(progress.eta_seconds)}` : "";
  return h("div", { class: "progress-cell" },
    h("progress", { max: 100, value: percent, "aria-label": `progress ${label}` }),
    h("span", { class: "muted" }, `${label}${eta}`));
}

export function methodName(method) {
  return (method && method.type) || "–";
}

// A field of a problem's errors[] said as a user reads it.
export function errorLines(error) {
  return error.errors.map((item) => {
    const where = item.member != null ? item.member
      : item.line != null ? `line ${item.line}` : item.field || item.param || "";
    return h("li", {}, where ? h("strong", {}, `${where}: `) : null, item.message || item.detail || "");
  });
}

export function errorBox(error) {
  return h("div", { class: "error", role: "alert" },
    h("strong", {}, error.title || "Error"),
    error.code ? h("code", { class: "code" }, error.code) : null,
    h("p", {}, error.message),
    error.errors && error.errors.length ? h("ul", {}, errorLines(error)) : null);
}

// Previous / "page N" / Next over a cursor-paged list: `state` holds `after` (the cursor of
// the page shown) and `cursors` (those of the pages before it); `reload` reads the page.
export function pagerControls(state, page, reload) {
  return [
    h("button", { type: "button", disabled: !state.cursors.length, onclick: () => {
      state.after = state.cursors.pop() ?? null;
      reload();
    } }, "Previous"),
    h("span", { class: "muted" }, `page ${state.cursors.length + 1}`),
    h("button", { type: "button", disabled: !page.has_more, onclick: () => {
      state.cursors.push(state.after);
      state.after = page.data[page.data.length - 1].id;
      reload();
    } }, "Next"),
  ];
}
