// New job: a form built from GET /models (model → its tasks → their methods) and the
// team's files; "Estimate" dry-runs the spec, "Start" creates the job.

import { ApiError, get, path, post } from "../api.js";
import { duration, errorBox, h, number, replace } from "../dom.js";

export async function newJobPage(main, _params, signal) {
  const [models, files] = await Promise.all([get("/models", { signal }),
    get(path("/files", { limit: 100 }), { signal })]);
  const usable = models.data.filter((m) => m.available !== false);
  const model = selectField("job-model", "Model", usable.map((m) => [m.id, m.description ? `${m.id} — ${m.description}` : m.id]));
  const task = selectField("job-task", "Task", []);
  const method = selectField("job-method", "Method", []);
  const fileChoices = files.data.map((f) => [f.id, `${f.filename} (${f.format}, ${f.examples} examples) · ${f.id}`]);
  const training = selectField("job-training-file", "Training file", fileChoices);
  const validation = selectField("job-validation-file", "Validation file (optional)", [["", "none: hold out a share of the training file"], ...fileChoices]);
  const epochs = textField("job-epochs", "Epochs", "auto", "a number, or auto");
  const rate = textField("job-learning-rate", "Learning rate", "auto", "a number, or auto");
  const suffix = textField("job-suffix", "Suffix (optional)", "", "a name for the result, e.g. support-bot");
  const extra = h("textarea", { id: "job-extra", rows: 4, spellcheck: "false",
    placeholder: '{"method": {"r": 8}, "hyperparameters": {"batch_size": 8}}' });
  const outcome = h("div", { "aria-live": "polite" });
  const estimateButton = h("button", { type: "button" }, "Estimate (dry run)");
  const startButton = h("button", { type: "submit", class: "primary" }, "Start job");

  const chosenModel = () => usable.find((m) => m.id === model.control.value);
  function fillTasks() {
    const m = chosenModel();
    setOptions(task.control, (m?.tasks || []).map((t) => [t, t]));
    fillMethods();
  }
  function fillMethods() {
    const m = chosenModel();
    const methods = m?.support?.[task.control.value] || [];
    setOptions(method.control, methods.map((t) => [t, t]), methods.includes("lora") ? "lora" : undefined);
  }
  model.control.addEventListener("change", fillTasks);
  task.control.addEventListener("change", fillMethods);

  function spec() {
    let more = {};
    if (extra.value.trim()) {
      try {
        more = JSON.parse(extra.value);
      } catch (error) {
        throw new ApiError(422, { title: "Advanced settings are not JSON", detail: String(error.message),
          errors: [{ field: "advanced", message: "not a JSON object" }] });
      }
    }
    const value = (text) => {
      const t = text.trim();
      return t === "" || t === "auto" ? "auto" : Number.isFinite(Number(t)) ? Number(t) : t;
    };
    const body = {
      model: model.control.value,
      task: task.control.value,
      training_file: training.control.value,
      method: { type: method.control.value, ...(more.method || {}) },
      hyperparameters: { n_epochs: value(epochs.control.value), learning_rate: value(rate.control.value),
        ...(more.hyperparameters || {}) },
    };
    if (validation.control.value) body.validation_file = validation.control.value;
    if (suffix.control.value.trim()) body.suffix = suffix.control.value.trim();
    for (const [name, v] of Object.entries(more)) if (!(name in body) || name === "metadata") body[name] = v;
    return body;
  }

  estimateButton.addEventListener("click", async () => {
    try {
      replace(outcome, h("p", { class: "muted" }, "Estimating…"));
      replace(outcome, estimateOf(await post(path("/jobs", { dry_run: "true" }), spec(), { signal })));
    } catch (error) {
      replace(outcome, errorBox(error));
    }
  });
  const form = h("form", { class: "card", onsubmit: async (event) => {
    event.preventDefault();
    startButton.disabled = true;
    try {
      const job = await post("/jobs", spec(), { signal });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      replace(outcome, errorBox(error));
    } finally {
      startButton.disabled = false;
    }
  } },
  model.field, task.field, method.field, training.field, validation.field,
  h("div", { class: "row" }, epochs.field, rate.field), suffix.field,
  h("details", {}, h("summary", {}, "Advanced settings (JSON)"),
    h("label", { for: "job-extra" }, "Merged into the job spec: method options, hyperparameters, metadata"),
    extra),
  h("div", { class: "buttons" }, estimateButton, startButton), outcome);

  replace(main, h("h1", {}, "New job"),
    files.data.length ? form : h("p", {}, "Upload a training file first: ", h("a", { href: "#/files" }, "Files"), "."));
  fillTasks();
}

function estimateOf(dry) {
  const e = dry.estimate;
  const hp = dry.hyperparameters;
  return h("section", { class: "estimate", "aria-label": "Estimate" },
    h("h2", {}, `About ${duration(e.estimated_seconds)}`),
    h("dl", { class: "facts" },
      ...[["Steps", number(e.total_steps)], e.unit === "images"
        ? ["Trained images", number(e.trained_images)] : ["Trained tokens", number(e.trained_tokens)],
        ["Training examples", number(e.n_train_examples)], ["Validation examples", number(e.n_validation_examples)],
        ["Evaluations", number(e.evaluations)], ["Checkpoints", number(e.checkpoints)],
        ["Epochs", String(hp.n_epochs)], ["Batch size", String(hp.batch_size)],
        ["Learning rate", number(hp.learning_rate)],
        ...Object.entries(e.seconds_by_phase || {}).map(([phase, s]) => [`${phase} time`, duration(s)])]
        .map(([term, value]) => h("div", {}, h("dt", {}, term), h("dd", {}, value)))),
    e.truncated_examples ? h("p", { class: "warning" }, `${e.truncated_examples} training examples are longer than max_seq_length and will be cut.`) : null,
    h("p", { class: "muted" }, `Speed from: ${e.basis}`));
}

function selectField(id, label, options) {
  const control = h("select", { id, required: !label.includes("optional") });
  setOptions(control, options);
  return { control, field: h("div", { class: "field" }, h("label", { for: id }, label), control) };
}

function textField(id, label, value, hint) {
  const control = h("input", { id, type: "text", value, "aria-describedby": `${id}-hint` });
  return { control, field: h("div", { class: "field" }, h("label", { for: id }, label), control,
    h("small", { id: `${id}-hint`, class: "muted" }, hint)) };
}

function setOptions(select, options, chosen) {
  replace(select, options.map(([value, text]) => h("option", { value, selected: value === chosen }, text)));
}
