// A finished job's results: the metrics of the weights its output holds (GET /jobs/{id}/metrics'
// `kept`), then its task's report: per-class scores and the confusion matrix for classification
// (text or images), per-type scores for NER. Whether to draw is the metrics' call alone: they
// carry `kept` and `report` only once the job's result is recorded, so a running job, or one
// that failed before its result, gets nothing here however stale the page's copy of the job.

import { h, number } from "../dom.js";

// The headline figures a reader looks for, in this order; what else `kept` holds is left out.
const HEADLINE = [
  ["accuracy", "Accuracy"], ["macro_f1", "Macro-F1"],
  ["entity_f1", "Entity F1"], ["entity_precision", "Entity precision"],
  ["entity_recall", "Entity recall"], ["token_accuracy", "Token accuracy"],
  ["eval_loss", "Eval loss"], ["eval_perplexity", "Perplexity"],
  ["eval_token_accuracy", "Token accuracy"], ["eval_reward_accuracy", "Reward accuracy"],
  ["eval_reward_margin", "Reward margin"],
];
const SCORE_COLUMNS = [["precision", "Precision"], ["recall", "Recall"], ["f1", "F1"]];
// The matrix's shades, .share-0 (none of the row) to .share-4 (three quarters or more): style.css.
const SHARE_LEGEND = ["none", "under 25%", "25–50%", "50–75%", "75% or more"];

export function resultsOf({ job, metrics }) {
  const { kept, report } = metrics;
  const figures = HEADLINE.filter(([name]) => Number.isFinite(kept?.[name]));
  if (!figures.length && !report) return null;
  const evaluation = job?.result?.evaluation || {};
  return h("section", { class: "results", "aria-labelledby": "results-title" },
    h("h2", { id: "results-title" }, "Results"),
    h("dl", { class: "kept" },
      figures.map(([name, label]) => fact(label, number(kept[name], 4))),
      metrics.best_step != null ? fact("Weights of step", number(metrics.best_step)) : null,
      evaluation.validation_examples
        ? fact("Validation examples", number(evaluation.validation_examples)) : null),
    evaluation.final ? h("p", { class: "muted" }, `Evaluation: ${evaluation.final}.`) : null,
    report?.per_class ? scoreTable("per-class", "Scores per class", "Label", report.per_class,
      report.labels) : null,
    Array.isArray(report?.confusion_matrix) && report.labels
      ? confusionMatrix(report.labels, report.confusion_matrix) : null,
    report?.per_type ? scoreTable("per-type", "Scores per entity type (exact spans)", "Type",
      report.per_type) : null);
}

function fact(term, value) {
  return h("div", {}, h("dt", {}, term), h("dd", {}, value));
}

// Precision, recall, F1 and support of each class (or entity type), in the report's order.
function scoreTable(kind, caption, first, rows, order = Object.keys(rows)) {
  return h("div", { class: "table-wrap" }, h("table", { class: `compact scores-table ${kind}` },
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, first),
      [...SCORE_COLUMNS, ["support", "Support"]].map(([, label]) =>
        h("th", { scope: "col", class: "num" }, label)))),
    h("tbody", {}, order.filter((name) => rows[name]).map((name) => h("tr", {},
      h("th", { scope: "row" }, name),
      SCORE_COLUMNS.map(([key]) => h("td", { class: "num" }, number(rows[name][key], 3))),
      h("td", { class: "num" }, number(rows[name].support)))))));
}

// Rows the true label, columns the predicted one. Each cell says its count as text and is
// shaded by its share of its row, so a class's confusions read the same whatever its size;
// the diagonal (the correct answers) is outlined and bold, not marked by colour alone.
function confusionMatrix(labels, matrix) {
  const header = labels.map((label) => h("th", { scope: "col" }, label));
  const rows = labels.map((label, i) => {
    const counts = matrix[i] || [];
    const total = counts.reduce((sum, count) => sum + count, 0);
    return h("tr", {}, h("th", { scope: "row" }, label), labels.map((predicted, j) => {
      const count = counts[j] ?? 0;
      const share = total ? count / total : 0;
      const shade = count ? Math.min(4, 1 + Math.floor(share * 4)) : 0;
      const title = `${count} of ${total} “${label}” predicted “${predicted}”`;
      return h("td", { class: `cell share-${shade}${i === j ? " diagonal" : ""}`,
        title: `${title} (${Math.round(share * 100)}%)` }, number(count));
    }));
  });
  return h("div", { class: "table-wrap" },
    h("table", { class: "confusion" },
      h("caption", {}, "Confusion matrix", h("span", { class: "caption-note" },
        "Rows are the true labels, columns the predicted ones; "
        + "the outlined diagonal counts the correct answers.")),
      h("thead", {},
        h("tr", {}, h("td", { class: "corner" }),
          h("th", { scope: "colgroup", colspan: labels.length, class: "axis" }, "Predicted label")),
        h("tr", {}, h("th", { scope: "col", class: "axis" }, "True label"), header)),
      h("tbody", {}, rows)),
    h("p", { class: "muted share-legend" }, "Shade: a cell's share of its row, ",
      SHARE_LEGEND.map((text, shade) => h("span", {},
        h("span", { class: `swatch share-${shade}`, "aria-hidden": "true" }), text))));
}
