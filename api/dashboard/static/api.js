// The page's one road to the API: every call sends the key in the Authorization header.
// The key lives in this tab's sessionStorage only: never in a URL, never logged.

const KEY = "tuneq.key";

export class ApiError extends Error {
  // A problem+json answer (or a network fault): status, code, detail, and the
  // line- or field-numbered errors[] where the input was at fault.
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.code = problem.code || null;
    this.title = problem.title || `HTTP ${status}`;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
    this.problem = problem;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  forget: () => sessionStorage.removeItem(KEY),
};

// Whether the API takes `value` as a key: true, false (401), or an ApiError for anything else.
export async function keyWorks(value) {
  let response;
  try {
    response = await fetch("/jobs?limit=1", { headers: { Authorization: `Bearer ${value}` } });
  } catch {
    throw new ApiError(0, { title: "Network error", detail: "The API could not be reached." });
  }
  if (response.status === 401) return false;
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  return true;
}

// Called when the API answers 401: the key was revoked or mistyped.
let onUnauthorized = () => {};
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

function headers(extra = {}) {
  const value = key.get();
  return value ? { Authorization: `Bearer ${value}`, ...extra } : { ...extra };
}

export function path(template, query = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null && value !== "") params.set(name, String(value));
  }
  const text = params.toString();
  return text ? `${template}?${text}` : template;
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { title: response.statusText || `HTTP ${response.status}` };
  }
}

export async function request(method, url, { json, body, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { title: "Network error", detail: "The API could not be reached." });
  }
  if (response.status === 401) onUnauthorized();
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  if (response.status === 204) return null;
  return response.json();
}

export const get = (url, options) => request("GET", url, options);
export const post = (url, json, options = {}) => request("POST", url, { ...options, json });

// Follow a job's Server-Sent Events with fetch (EventSource cannot send a header), resuming
// after the last id on a dropped connection, until the server sends `end` or `signal` aborts.
export async function followEvents(jobId, after, { onEvent, onEnd, signal }) {
  let last = after;
  while (!signal.aborted) {
    try {
      const response = await fetch(path(`/jobs/${encodeURIComponent(jobId)}/events/stream`,
        { after: last }), { headers: headers({ Accept: "text/event-stream" }), signal });
      if (!response.ok) throw new ApiError(response.status, await problemOf(response));
      const ended = await readStream(response.body, (message) => {
        if (message.event === "end") {
          onEnd(JSON.parse(message.data));
          return;
        }
        if (message.id) last = Number(message.id);
        onEvent(JSON.parse(message.data));
      });
      if (ended) return;
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status >= 400 && error.status < 500) throw error;
    }
    await sleep(2000, signal);
  }
}

// Parse text/event-stream into messages; true when an `end` event came.
async function readStream(body, dispatch) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return ended;
    buffer += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const message = { event: "message", data: "", id: null };
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") data.push(text);
        else if (field === "event") message.event = text;
        else if (field === "id") message.id = text;
      }
      if (!data.length) continue;
      message.data = data.join("\n");
      if (message.event === "end") ended = true;
      dispatch(message);
    }
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// Download an artifact or a file: S3 gives a presigned URL to navigate to; the local store
// streams through the API, read here with the key and saved from memory.
export async function download(url, filename) {
  const response = await fetch(path(url, { redirect: "false" }), { headers: headers() });
  if (response.status === 401) onUnauthorized();
  if (!response.ok) throw new ApiError(response.status, await problemOf(response));
  let href;
  if ((response.headers.get("Content-Type") || "").startsWith("application/json")) {
    const answer = await response.json();
    href = answer.url;
    filename = answer.filename || filename;
  } else {
    href = URL.createObjectURL(await response.blob());
  }
  const link = document.createElement("a");
  link.href = href;
  link.download = filename;
  link.rel = "noopener";
  document.body.append(link);
  link.click();
  link.remove();
  if (href.startsWith("blob:")) setTimeout(() => URL.revokeObjectURL(href), 60000);
}
