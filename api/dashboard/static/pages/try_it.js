// "Try it": ask the job's adapter (or a checkpoint) through POST /jobs/{id}/generate, which
// a worker answers: a chat for causal LM (a prompt to continue where the job trained on
// prompt/completion or plain text), a label with scores, or a tag per word.

import { post } from "../api.js";
import { errorBox, h, number, replace } from "../dom.js";

const TASKS = new Set(["causal_lm", "seq_classification", "token_classification"]);

const PROMPTED = new Set(["prompt_completion", "text"]); // trained without a chat template

export function tryItBox({ job, checkpoints, trainingFormat }, base) {
  const section = h("section", { class: "card", "aria-labelledby": "try-title" },
    h("h2", { id: "try-title" }, "Try it"));
  if (!TASKS.has(job.task)) {
    section.append(h("p", { class: "muted" }, `Jobs of task ${job.task} cannot be tried here.`));
    return section;
  }
  const weights = h("select", { id: "try-weights" },
    h("option", { value: "" }, "the job's adapter"),
    checkpoints.map((c) => h("option", { value: c.step }, `checkpoint of step ${c.step}`)));
  const answer = h("div", { class: "answer", "aria-live": "polite" });
  const mode = job.task !== "causal_lm" ? job.task : PROMPTED.has(trainingFormat) ? "prompt" : "chat";
  const history = [];
  const transcript = h("ol", { class: "chat" });
  const input = h("textarea", { id: "try-input", rows: job.task === "causal_lm" ? 3 : 2,
    required: true, maxlength: 8000 });
  const pair = job.task === "seq_classification"
    ? h("input", { id: "try-pair", type: "text", maxlength: 8000 }) : null;
  const submit = h("button", { type: "submit", class: "primary" }, { chat: "Send",
    prompt: "Continue", seq_classification: "Classify", token_classification: "Tag" }[mode]);

  const form = h("form", { onsubmit: async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    const body = requestFor(mode, text, pair?.value.trim(), history);
    if (weights.value !== "") body.checkpoint = Number(weights.value);
    submit.disabled = true;
    replace(answer, h("p", { class: "muted" }, "Waiting for a worker…"));
    try {
      const reply = await post(`${base}/generate`, body);
      if (mode === "prompt") {
        replace(answer, h("p", { class: "continued" }, text, " ",
          h("strong", {}, reply.message.content)),
        reply.finish_reason === "length" ? h("p", { class: "muted" }, "The answer reached its length limit.") : null);
      } else if (mode === "chat") {
        history.push({ role: "user", content: text }, reply.message);
        drawChat(transcript, history);
        input.value = "";
        replace(answer, reply.finish_reason === "length"
          ? h("p", { class: "muted" }, "The answer reached its length limit.") : null);
      } else {
        replace(answer, job.task === "seq_classification" ? labelOf(reply) : tagsOf(reply));
      }
    } catch (error) {
      replace(answer, errorBox(error));
    } finally {
      submit.disabled = false;
    }
  } },
  h("div", { class: "field" }, h("label", { for: "try-weights" }, "Weights"), weights),
  mode === "chat" ? transcript : null,
  h("div", { class: "field" }, h("label", { for: "try-input" }, { chat: "Your message",
    prompt: "Prompt (continued as it stands, as the job's data was)", seq_classification: "Text",
    token_classification: "Sentence" }[mode]),
  input),
  pair ? h("div", { class: "field" }, h("label", { for: "try-pair" }, "Second text (optional)"), pair) : null,
  h("div", { class: "buttons" }, submit,
    mode === "chat" ? h("button", { type: "button", class: "quiet", onclick: () => {
      history.length = 0;
      drawChat(transcript, history);
      replace(answer);
    } }, "New conversation") : null),
  answer);
  if (job.status !== "succeeded" && !checkpoints.length) {
    section.append(h("p", { class: "muted" }, "The job has no adapter or checkpoint yet."));
    return section;
  }
  section.append(form);
  return section;
}

function requestFor(mode, text, pair, history) {
  if (mode === "chat") return { messages: [...history, { role: "user", content: text }] };
  if (mode === "prompt") return { prompt: text };
  if (mode === "seq_classification") return pair ? { text, text_pair: pair } : { text };
  return { text };
}

function drawChat(transcript, history) {
  replace(transcript, history.map((message) => h("li", { class: `chat-${message.role}` },
    h("span", { class: "who" }, message.role === "user" ? "You" : "Model"),
    h("p", {}, message.content))));
}

function labelOf(reply) {
  const scores = Object.entries(reply.scores).sort((a, b) => b[1] - a[1]);
  return h("div", {},
    h("p", {}, "Label: ", h("strong", { class: "label" }, reply.label)),
    h("table", { class: "compact scores" }, h("tbody", {}, scores.map(([label, score]) =>
      h("tr", {}, h("th", { scope: "row" }, label),
        h("td", {}, h("meter", { min: 0, max: 1, value: score, "aria-label": `${label} ${number(score, 3)}` })),
        h("td", {}, `${(score * 100).toFixed(1)}%`))))));
}

function tagsOf(reply) {
  return h("ol", { class: "tags", "aria-label": "Tagged words" }, reply.tokens.map((token) =>
    h("li", { class: token.tag === "O" ? "tag-o" : "tag-entity" },
      h("span", { class: "word" }, token.token),
      h("span", { class: "tag" }, token.tag))));
}
