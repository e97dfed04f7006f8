// Workflows saved before 2026-11-28 by EPD Distill and EPD RDPO: the frontend puts a node's saved widget values on
// its widgets by position, and these nodes' widgets have moved since (their seeds got a "control after generate"
// widget; EPD Distill's `steps` and `afs` became `nfe`). Without this, such a workflow loaded with EPD Distill's
// `afs` in `filename`, its filename in `overwrite` and its `steps` read as `nfe`. Each saved value goes back on the
// widget it was saved for; `steps` and `afs` (time points of an EPD table, analytic first step) become that table's
// `nfe` and student `epd`; the seed's new control is "fixed", as the seed then stayed.
import { app } from "../../scripts/app.js";

const DISTILL_WITHOUT_CONTROL = ["cfg", "steps", "points", "teacher", "teacher_steps", "iterations", "batch",
  "learning_rate", "seed", "learn_grid", "afs", "filename", "overwrite", "final_estimate"];
const DISTILL_WITH_AFS = ["cfg", "steps", "points", "teacher", "teacher_steps", "iterations", "batch",
  "learning_rate", "seed", "control_after_generate", "learn_grid", "afs", "filename", "overwrite", "final_estimate"];
const RDPO_WITHOUT_CONTROL = ["cfg", "reward", "teacher_steps", "iterations", "groups", "group_size",
  "concentration", "learning_rate", "seed", "filename", "overwrite", "prompt"];

// The saved layout, told by where a boolean stands that today's layout has a string (a combo or a file name).
function savedLayout(type, values) {
  if (type === "EPDDistill" && typeof values[9] === "boolean") return DISTILL_WITHOUT_CONTROL;
  if (type === "EPDDistill" && typeof values[11] === "boolean") return DISTILL_WITH_AFS;
  if (type === "EPDRDPO" && typeof values[10] === "boolean") return RDPO_WITHOUT_CONTROL;
  return null;
}

export function savedValues(type, values) {
  const layout = Array.isArray(values) ? savedLayout(type, values) : null;
  if (!layout) return null;
  const named = Object.fromEntries(values.slice(0, layout.length).map((value, i) => [layout[i], value]));
  named.control_after_generate ??= "fixed";
  if ("steps" in named) {
    named.nfe = 2 * (named.steps - 1) - (named.afs ? 1 : 0);
    named.student = "epd";
    delete named.steps;
    delete named.afs;
  }
  return named;
}

// An input's default in the node's definition (undefined for the seed's control, which has none there).
function inputDefault(nodeData, name) {
  return (nodeData.input?.required?.[name] ?? nodeData.input?.optional?.[name])?.[1]?.default;
}

app.registerExtension({
  name: "epd_solver.saved_workflows",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "EPDDistill" && nodeData.name !== "EPDRDPO") return;
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const named = savedValues(nodeData.name, info.widgets_values);
      if (!named) return result;
      // The frontend put saved value i on widget i: a widget the saved layout did not have gets its default back
      // (a 2026-11-28 Distill's final_estimate landed on objective).
      (this.widgets ?? []).forEach((widget, i) => {
        if (widget.name in named) widget.value = named[widget.name];
        else if (i < info.widgets_values.length && inputDefault(nodeData, widget.name) !== undefined) {
          widget.value = inputDefault(nodeData, widget.name);
        }
      });
      return result;
    };
  },
});
