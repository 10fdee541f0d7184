// The method forms, generated from GET /api/methods (each registered method's config JSON schema):
// nothing here names a method. Ids: the section #method-<type>, its checkbox #method-<type>-enable
// and one input per field #method-<type>-<field>. A field whose schema carries a `ui` hint (set
// with Field(json_schema_extra=...), see methods/base.py) offers the model's own modules instead:
// "linear_targets" its linear layers, "blocks" the sub-modules of a layer, as checkboxes of class
// module-option inside #method-<type>-<field>; a "per_target" dict field adds a number input
// (class per-target, #method-<type>-<field>-<module>) beside each module of that list.
// Uses $ and el from index.html; the entry of a method is named after its type.

const MODULE_LISTS = {linear_targets: "linear", blocks: "blocks"};  // ui hint -> list of /api/modules
// ticked when a linear-targets field has no default: the attention projections of the supported
// architectures (names of the model's modules, not of methods); else the form's start values
const PRESELECTED_LINEAR = ["q_proj", "v_proj", "c_attn", "query_key_value"];
const FORMS = [];
let MODULES = {linear: [], blocks: []};

function renderMethods(catalog) {
  FORMS.length = 0;
  $("methods").replaceChildren(...Object.entries(catalog).map(([type, info]) => methodForm(type, info)));
}

function methodForm(type, info) {
  const form = {type, entry: type, start: info.start || info.example || {}, fields: []};
  const section = el("div", {class: "method", id: `method-${type}`, "data-type": type});
  form.enable = el("input", {type: "checkbox", id: `method-${type}-enable`, class: "method-enable", value: type});
  form.enable.checked = Boolean(info.enabled_by_default);
  const head = el("h3"), title = el("label");
  title.append(form.enable, " " + type);
  head.append(title, el("span", {class: "doc"}, (info.doc || "").replaceAll("``", "")));
  const body = el("div", {class: "method-fields"});
  body.hidden = !form.enable.checked;
  form.enable.addEventListener("change", () => { body.hidden = !form.enable.checked; refreshStageEntries(); });
  const required = info.schema.required || [];
  for (const [name, prop] of Object.entries(info.schema.properties || {})) {
    if (name !== "type") form.fields.push(makeField(form, name, prop, required.includes(name)));
  }
  const lists = form.fields.filter((f) => f.kind === "modules");  // per-target numbers go beside the first
  for (const f of form.fields.filter((f) => f.kind === "per_target")) (lists[0] ? lists[0].perTarget.push(f) : toJson(f));
  body.append(...form.fields.filter((f) => f.node).map((f) => f.node));
  section.append(head, body);
  FORMS.push(form);
  return section;
}

// the one schema to build an input from: a nullable field's other option, a union's first scalar one
function plain(prop) {
  const options = prop.anyOf ? prop.anyOf.filter((o) => o.type !== "null") : [prop];
  const scalar = options.find((o) => ["integer", "number", "boolean", "string"].includes(o.type));
  return {shape: options.length === 1 ? options[0] : scalar || {}, nullable: options.length < (prop.anyOf || [prop]).length};
}

function makeField(form, name, prop, required) {
  const {shape, nullable} = plain(prop);
  const id = `method-${form.type}-${name}`, text = (prop.title || name).toLowerCase();
  const field = {name, prop, required, nullable, id, label: text, perTarget: []};
  field.start = name in form.start ? form.start[name] : prop.default;
  const label = el("label", {title: prop.description || ""});
  if (MODULE_LISTS[prop.ui] && shape.type === "array") {
    field.kind = "modules"; field.list = MODULE_LISTS[prop.ui];
    field.box = el("div", {id, class: "modules"});
    field.node = el("div", {class: "field"}, text + ":");
    field.node.append(field.box);
    return field;
  }
  if (prop.ui === "per_target" && shape.type === "object") { field.kind = "per_target"; field.shape = shape; return field; }
  let input;
  if (shape.enum) {
    field.kind = "enum";
    input = el("select", {id});
    input.append(...(nullable ? [el("option", {value: ""}, "(none)")] : []), ...shape.enum.map((v) => el("option", {value: v}, v)));
    input.value = field.start ?? "";
  } else if (shape.type === "integer" || shape.type === "number") {
    field.kind = "number";
    input = el("input", {type: "number", id, step: shape.type === "integer" ? "1" : "any"});
    const low = shape.minimum ?? shape.exclusiveMinimum, high = shape.maximum ?? shape.exclusiveMaximum;
    if (low !== undefined) input.min = low;
    if (high !== undefined) input.max = high;
    if (typeof field.start === "number") input.value = field.start;
  } else if (shape.type === "boolean") {
    field.kind = "bool";
    input = el("input", {type: "checkbox", id});
    input.checked = Boolean(field.start);
  } else if (shape.type === "string" || (shape.type === "array" && (shape.items || {}).type === "string")) {
    field.kind = shape.type === "string" ? "text" : "list";
    input = el("input", {id, size: "14", placeholder: field.kind === "list" ? "a, b" : ""});
    input.value = field.start == null ? "" : [].concat(field.start).join(", ");
  } else {
    return toJson(field);
  }
  field.input = input;
  label.append(text + " ", input);
  field.node = label;
  return field;
}

// anything else (a dict, a nested object): JSON typed in a text box, blank for the default
function toJson(field) {
  field.kind = "json";
  field.input = el("input", {id: field.id, size: "24", placeholder: "JSON"});
  field.input.value = field.start === undefined || field.start === null ? "" : JSON.stringify(field.start);
  field.node = el("label");
  field.node.append(field.label + " ", field.input);
  return field;
}

function setModules(info) {
  MODULES = info;
  for (const form of FORMS) {
    for (const field of form.fields.filter((f) => f.kind === "modules")) renderModules(field);
  }
}

function renderModules(field) {
  const linear = field.list === "linear";
  const names = linear ? MODULES.linear.map((l) => l.name) : MODULES.blocks;
  const preset = linear && !("default" in field.prop) ? PRESELECTED_LINEAR.filter((n) => names.includes(n)) : [];
  const chosen = preset.length ? preset : [].concat(field.start || []);
  field.box.replaceChildren(...names.map((name, i) => {
    const row = el(linear ? "span" : "label", linear ? {class: "target"} : {});
    const box = el("input", {type: "checkbox", class: "module-option", id: `${field.id}-${name}`, value: name});
    box.checked = chosen.includes(name);
    row.append(box, " " + name + (linear ? ` (×${MODULES.linear[i].count})` : ""));
    for (const extra of field.perTarget) {
      const kind = (extra.shape.additionalProperties || {}).type;
      row.append(` ${extra.label} `, el("input", {type: "number", class: "per-target", id: `${extra.id}-${name}`,
        "data-target": name, "data-field": extra.name, step: kind === "integer" ? "1" : "any", value: (extra.start || {})[name] ?? "",
        title: `${extra.label} for ${name} (blank: the entry's own)`}));
    }
    return row;
  }));
}

// a field's value as the page holds it; undefined: left unset (the config's default applies)
function readField(form, field) {
  const blank = () => (field.nullable ? null : undefined);
  const value = field.input ? field.input.value.trim() : "";
  switch (field.kind) {
    case "modules": return [...field.box.querySelectorAll(".module-option:checked")].map((b) => b.value);
    case "per_target": {
      const owner = form.fields.find((f) => f.perTarget.includes(field));
      const chosen = readField(form, owner), out = {};
      owner.box.querySelectorAll(`.per-target[data-field="${field.name}"]`).forEach((input) => {
        if (input.value && chosen.includes(input.dataset.target)) out[input.dataset.target] = Number(input.value);
      });
      return out;
    }
    case "number": return value === "" ? blank() : Number(value);
    case "bool": return field.input.checked;
    case "enum": case "text": return value === "" ? blank() : value;
    case "list": return value === "" ? (field.nullable ? null : []) : value.split(",").map((s) => s.trim()).filter(Boolean);
    default: try { return value === "" ? undefined : JSON.parse(value); } catch { return value; }  // the check names it
  }
}

// {entry: {type, ...fields}} of the enabled methods: required fields and those not at their default
function methodEntries() {
  const methods = {};
  for (const form of FORMS.filter((f) => f.enable.checked)) {
    const entry = {type: form.type};
    for (const field of form.fields) {
      const value = readField(form, field);
      if (value === undefined) continue;
      if (field.required || !("default" in field.prop) || JSON.stringify(value) !== JSON.stringify(field.prop.default)) {
        entry[field.name] = value;
      }
    }
    methods[form.entry] = entry;
  }
  return methods;
}

const enabledEntries = () => FORMS.filter((f) => f.enable.checked).map((f) => f.entry);
