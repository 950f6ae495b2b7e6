// The journey editor (issue 15 item 6): a graph of steps drawn with the vendored Drawflow
// (static/vendor/drawflow-0.0.60.min.js, MIT). The journey definition (docs/journeys.md) is the
// one source of truth: the graph is redrawn from it after every change, connections drawn on the
// canvas and the "Next" pickers of the side panel both write its `next` fields. Every change is
// checked by the server's validation (POST .../validate) and each error is shown next to its
// step. In the read-only view of a live journey, the counts per step are fetched again every
// few seconds, without reloading the page.
(function () {
  "use strict";
  var root = document.getElementById("journey-editor");
  if (!root || typeof Drawflow === "undefined") { return; }
  var data = JSON.parse(document.getElementById("journey-data").textContent);
  var token = document.body.dataset.csrfToken;
  var readonly = !!data.readonly;
  var def = data.definition;
  var choices = data.choices || {};
  var hints = data.hints || {};
  var urls = data.urls || {};
  var journeyId = data.journey && data.journey.id;
  var errors = [];            // [{path, step, message}] of the last validation
  var counts = null;          // the running view's counts
  var selected = null;        // the step id shown in the side panel (null: journey settings)
  var nodeOf = {}, stepOf = {};
  var syncing = false, validateTimer = null, validateSerial = 0, dirty = false;

  var TYPES = {
    send: "Send email", wait: "Wait", wait_until: "Wait until", wait_event: "Wait for event",
    branch: "Branch", split: "A/B split", update: "Update contact", notify: "Notify staff",
    webhook: "Webhook", exit: "Exit"
  };
  var WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
  var ENGAGEMENT = ["opened", "clicked", "not_opened", "converted"];
  var OPS = choices.ops || ["eq", "ne"];

  def.steps = def.steps || {};
  def.layout = def.layout || {};

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (v === undefined || v === null || v === false) { return; }
      if (k === "text") { e.textContent = v; }
      else if (k === "className") { e.className = v; }
      else { e.setAttribute(k, v === true ? "" : v); }
    });
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) { return; }
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return e;
  }

  function api(method, url, body) {
    var headers = { "X-CSRF-Token": token, "Accept": "application/json" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    return fetch(url, { method: method, headers: headers, credentials: "same-origin",
                        body: body === undefined ? undefined : JSON.stringify(body) }).then(function (r) {
      return r.json().then(function (payload) {
        if (!r.ok) {
          var err = new Error((payload.error && payload.error.message) || "The request failed.");
          err.detail = payload.error || {};
          err.payload = payload;
          throw err;
        }
        return payload;
      });
    });
  }

  function successors(step) {
    switch (step.type) {
      case "branch": return (step.cases || []).map(function (c) { return c.next; }).concat([step["default"]]);
      case "split": return (step.variants || []).map(function (v) { return v.next; });
      case "wait_event": return [step.next, step.timeout_next];
      case "exit": return [];
      default: return [step.next];
    }
  }

  function outputLabels(step) {
    switch (step.type) {
      case "branch": return (step.cases || []).map(function (c, i) { return "case " + (i + 1); }).concat(["default"]);
      case "split": return (step.variants || []).map(function (v) { return v.name || "?"; });
      case "wait_event": return ["event", "timeout"];
      case "exit": return [];
      default: return ["next"];
    }
  }

  function setSuccessor(step, index, target) {
    var v = target || null;
    switch (step.type) {
      case "branch":
        if (index < (step.cases || []).length) { step.cases[index].next = v; } else { step["default"] = v; }
        return;
      case "split":
        if (step.variants && step.variants[index]) { step.variants[index].next = v; }
        return;
      case "wait_event":
        if (index === 0) { step.next = v; } else { step.timeout_next = v; }
        return;
      case "exit": return;
      default: step.next = v;
    }
  }

  function newStepId() {
    var n = 1;
    while (def.steps["s" + n]) { n += 1; }
    return "s" + n;
  }

  function templateLabel(id, version) {
    var t = (choices.templates || []).filter(function (x) { return x.id === id; })[0];
    if (!t) { return id ? "(unknown template)" : "no template chosen"; }
    return t.name + (version ? " — v" + version : "");
  }

  function summary(sid, step) {
    switch (step.type) {
      case "send": return templateLabel(step.template_id, step.template_version);
      case "wait": return "for " + (step.duration || "?");
      case "wait_until": return "until " + (step.time || "?") + ((step.weekdays || []).length ? " on " +
        step.weekdays.map(function (d) { return WEEKDAYS[d - 1] || d; }).join(" ") : "");
      case "wait_event": return (step.event || "?") + ", timeout " + (step.timeout || "?");
      case "branch": return (step.cases || []).length + " case(s) + default";
      case "split": return (step.variants || []).map(function (v) { return (v.name || "?") + " " + (v.weight || 0) + "%"; }).join(" / ");
      case "update": return (step.action || "?") + " " + (step.field || step.topic_id || "");
      case "notify": return "notify " + (step.role || step.user_id || "?");
      case "webhook": return step.event || "journey.step";
      default: return "";
    }
  }

  // ------------------------------------------------------------------ the graph

  var canvas = document.getElementById("journey-canvas");
  var editor = new Drawflow(canvas);
  editor.reroute = false;
  editor.force_first_input = true;
  editor.editor_mode = readonly ? "fixed" : "edit";
  editor.start();

  function stepErrors(sid) {
    return errors.filter(function (e) { return e.step === sid; });
  }

  function fillNode(nodeId, sid, step) {
    var box = canvas.querySelector("#node-" + nodeId + " .drawflow_content_node");
    if (!box) { return; }
    box.textContent = "";
    var errs = stepErrors(sid);
    var head = el("div", { className: "jstep-head" }, [
      el("span", { className: "jstep-type", text: TYPES[step.type] || step.type }),
      def.start === sid ? el("span", { className: "badge ok", text: "start", "data-testid": "start-badge" }) : null
    ]);
    box.appendChild(head);
    box.appendChild(el("div", { className: "jstep-id", text: sid }));
    box.appendChild(el("div", { className: "jstep-summary", text: summary(sid, step) }));
    if (counts) {
      var c = (counts.steps || {})[sid] || {};
      box.appendChild(el("div", { className: "jstep-count", "data-testid": "node-count-" + sid },
                         ["now " + (c.now == null ? 0 : c.now) + " · done " + (c.executed == null ? 0 : c.executed)]));
    }
    if (errs.length) {
      var list = el("ul", { className: "jstep-errors", "data-testid": "step-errors-" + sid });
      errs.forEach(function (e) { list.appendChild(el("li", { "data-testid": "step-error", text: e.message })); });
      box.appendChild(list);
    }
    var node = canvas.querySelector("#node-" + nodeId);
    node.classList.toggle("has-error", errs.length > 0);
    node.classList.toggle("is-start", def.start === sid);
    node.setAttribute("data-step", sid);
    node.setAttribute("data-testid", "step-node");
    var outs = node.querySelectorAll(".outputs .output");
    var labels = outputLabels(step);
    for (var i = 0; i < outs.length; i++) {
      outs[i].setAttribute("data-label", labels[i] || "");
      outs[i].setAttribute("title", labels[i] || "");
      outs[i].setAttribute("data-testid", "output-" + sid + "-" + (i + 1));
    }
    var input = node.querySelector(".inputs .input");
    if (input) { input.setAttribute("data-testid", "input-" + sid); }
  }

  function draw() {
    syncing = true;
    try {
      editor.clear();
      nodeOf = {}; stepOf = {};
      Object.keys(def.steps).forEach(function (sid, i) {
        var step = def.steps[sid];
        var pos = def.layout[sid] || { x: 40 + (i % 2) * 240, y: 40 + Math.floor(i / 2) * 150 };
        def.layout[sid] = pos;
        var id = editor.addNode(step.type, 1, outputLabels(step).length, pos.x, pos.y, "jstep-node jstep-" + step.type,
                                { step: sid }, "");
        nodeOf[sid] = id; stepOf[id] = sid;
        fillNode(id, sid, step);
      });
      Object.keys(def.steps).forEach(function (sid) {
        successors(def.steps[sid]).forEach(function (target, i) {
          if (target && nodeOf[target] !== undefined) {
            editor.addConnection(nodeOf[sid], nodeOf[target], "output_" + (i + 1), "input_1");
          }
        });
      });
      if (selected && nodeOf[selected] !== undefined) {
        var n = canvas.querySelector("#node-" + nodeOf[selected]);
        if (n) { n.classList.add("selected"); }
      }
    } finally {
      syncing = false;
    }
  }

  function refreshNodes() {
    Object.keys(nodeOf).forEach(function (sid) { if (def.steps[sid]) { fillNode(nodeOf[sid], sid, def.steps[sid]); } });
  }

  function changed(redraw) {
    dirty = true;
    if (redraw) { draw(); } else { refreshNodes(); }
    scheduleValidate();
    updateSaveState();
  }

  editor.on("connectionCreated", function (c) {
    if (syncing) { return; }
    var sid = stepOf[c.output_id], target = stepOf[c.input_id];
    if (!sid || !target) { return; }
    setSuccessor(def.steps[sid], parseInt(c.output_class.split("_")[1], 10) - 1, target);
    setTimeout(function () { changed(true); if (selected === sid) { showPanel(); } }, 0);
  });
  editor.on("connectionRemoved", function (c) {
    if (syncing) { return; }
    var sid = stepOf[c.output_id], target = stepOf[c.input_id];
    if (!sid || !def.steps[sid]) { return; }
    var i = parseInt(c.output_class.split("_")[1], 10) - 1;
    if (successors(def.steps[sid])[i] === target) { setSuccessor(def.steps[sid], i, null); }
    setTimeout(function () { changed(true); if (selected === sid) { showPanel(); } }, 0);
  });
  editor.on("nodeRemoved", function (id) {
    if (syncing) { return; }
    var sid = stepOf[id];
    if (sid) { setTimeout(function () { removeStep(sid); }, 0); }
  });
  editor.on("nodeMoved", function (id) {
    var sid = stepOf[id];
    if (!sid) { return; }
    var node = editor.getNodeFromId(id);
    def.layout[sid] = { x: Math.round(node.pos_x), y: Math.round(node.pos_y) };
    if (!readonly) { dirty = true; updateSaveState(); }
  });
  editor.on("nodeSelected", function (id) {
    if (syncing) { return; }
    selected = stepOf[id] || null;
    showPanel();
  });
  editor.on("nodeUnselected", function () {
    if (syncing) { return; }
    selected = null;
    showPanel();
  });

  // ------------------------------------------------------------------ editing steps

  function addStep(type) {
    var sid = newStepId();
    var step = { type: type };
    if (type === "send") { step.template_id = null; step.template_version = null; }
    if (type === "wait") { step.duration = "1d"; }
    if (type === "wait_until") { step.time = "09:00"; step.weekdays = [1, 2, 3, 4, 5]; }
    if (type === "wait_event") { step.event = (choices.events || [])[0] || ""; step.timeout = "3d"; step.next = null; step.timeout_next = null; }
    if (type === "branch") { step.cases = [{ when: { kind: "engagement", step: "", is: "opened" }, next: null }]; step["default"] = null; }
    if (type === "split") { step.variants = [{ name: "A", weight: 50, next: null }, { name: "B", weight: 50, next: null }]; }
    if (type === "update") { step.action = "set_field"; step.field = ""; step.value = ""; }
    if (type === "notify") { step.role = (choices.roles || ["marketer"])[0]; step.text = ""; }
    if (type === "webhook") { step.event = "journey.step"; }
    if (type !== "exit" && type !== "branch" && type !== "split" && type !== "wait_event") { step.next = null; }
    def.steps[sid] = step;
    var n = Object.keys(def.steps).length - 1;
    def.layout[sid] = { x: 40 + (n % 2) * 240, y: 40 + Math.floor(n / 2) * 150 };
    if (!def.start) { def.start = sid; }
    selected = sid;
    changed(true);
    showPanel();
    return sid;
  }

  function removeStep(sid) {
    if (!def.steps[sid]) { return; }
    delete def.steps[sid];
    delete def.layout[sid];
    Object.keys(def.steps).forEach(function (other) {
      var step = def.steps[other];
      successors(step).forEach(function (t, i) { if (t === sid) { setSuccessor(step, i, null); } });
    });
    if (def.start === sid) { def.start = Object.keys(def.steps)[0] || null; }
    if (selected === sid) { selected = null; }
    changed(true);
    showPanel();
  }

  // ------------------------------------------------------------------ the side panel

  var panel = document.getElementById("journey-panel");
  // Drawflow deletes the selected node on the Delete key anywhere in the document: keys typed in
  // a field of the editor (name, side panel) never reach it.
  root.addEventListener("keydown", function (e) {
    if (e.target.closest("input, select, textarea, button")) { e.stopPropagation(); }
  });

  function field(label, control, id, testid, help) {
    control.id = id;
    if (testid) { control.setAttribute("data-testid", testid); }
    if (readonly) { control.disabled = true; }
    var wrap = el("div", { className: "field" }, [el("label", { "for": id, text: label }), control]);
    if (help) { wrap.appendChild(el("p", { className: "hint", text: help })); }
    return wrap;
  }

  function select(options, value, onchange, allowEmpty) {
    var s = el("select");
    if (allowEmpty) { s.appendChild(el("option", { value: "", text: allowEmpty })); }
    options.forEach(function (o) {
      var v = Array.isArray(o) ? o[0] : o, label = Array.isArray(o) ? o[1] : o;
      s.appendChild(el("option", { value: v, text: label, selected: String(v) === String(value == null ? "" : value) }));
    });
    if (value != null && value !== "" && !options.some(function (o) { return String(Array.isArray(o) ? o[0] : o) === String(value); })) {
      s.appendChild(el("option", { value: value, text: value + " (unknown)", selected: true }));
    }
    s.addEventListener("change", function () { onchange(s.value); });
    return s;
  }

  function input(value, onchange, attrs) {
    var i = el("input", Object.assign({ value: value == null ? "" : String(value) }, attrs || {}));
    i.addEventListener("change", function () { onchange(i.value); });
    return i;
  }

  function errorsFor(prefix) {
    return errors.filter(function (e) { return e.path === prefix || (e.path || "").indexOf(prefix + ".") === 0; });
  }

  function errorList(items) {
    if (!items.length) { return null; }
    var ul = el("ul", { className: "field-error panel-errors", "data-testid": "panel-errors", role: "alert" });
    items.forEach(function (e) { ul.appendChild(el("li", { text: (e.path ? e.path + ": " : "") + e.message })); });
    return ul;
  }

  function stepOptions(exclude) {
    return Object.keys(def.steps).filter(function (s) { return s !== exclude; }).map(function (s) {
      return [s, s + " — " + (TYPES[def.steps[s].type] || def.steps[s].type)];
    });
  }

  function nextPickers(sid, step) {
    var labels = outputLabels(step), targets = successors(step);
    var box = el("fieldset", { className: "next-pickers" }, [el("legend", { text: "Next steps" })]);
    labels.forEach(function (label, i) {
      box.appendChild(field("After: " + label, select(stepOptions(sid), targets[i], function (v) {
        setSuccessor(step, i, v || null); changed(true);
      }, "— not connected —"), "next-" + sid + "-" + i, "next-" + (i + 1)));
    });
    return box;
  }

  function stepPanel(sid) {
    var step = def.steps[sid];
    var out = [el("h2", { text: (TYPES[step.type] || step.type) + " · " + sid, "data-testid": "panel-title" })];
    out.push(errorList(errorsFor("steps." + sid)));
    var set = function (k) { return function (v) { step[k] = v === "" ? null : v; changed(false); }; };
    if (step.type === "send") {
      var opts = [];
      (choices.templates || []).forEach(function (t) {
        (t.versions || []).forEach(function (v) {
          opts.push([t.id + ":" + v, t.name + " — v" + v + " (" + (t.purpose || "?") + ")"]);
        });
      });
      var cur = step.template_id ? step.template_id + ":" + (step.template_version || "") : "";
      out.push(field("Template", select(opts, cur, function (v) {
        if (!v) { step.template_id = null; step.template_version = null; }
        else { var p = v.split(":"); step.template_id = p[0]; step.template_version = parseInt(p[1], 10); }
        changed(false);
      }, "— choose a template —"), "f-template", "template-picker", hints[sid] ? "Suggested: " + hints[sid] : null));
    }
    if (step.type === "wait") {
      out.push(field("Duration", input(step.duration, set("duration"), { placeholder: "2d" }), "f-duration", "duration",
                     "30m, 2h, 2d or 1w"));
    }
    if (step.type === "wait_until") {
      out.push(field("Local time", input(step.time, set("time"), { placeholder: "09:00" }), "f-time", "time"));
      var days = el("fieldset", { className: "weekdays" }, [el("legend", { text: "Weekdays (patient's time zone)" })]);
      WEEKDAYS.forEach(function (d, i) {
        var cb = el("input", { type: "checkbox", id: "wd-" + (i + 1), checked: (step.weekdays || []).indexOf(i + 1) >= 0, disabled: readonly });
        cb.addEventListener("change", function () {
          var list = (step.weekdays || []).filter(function (x) { return x !== i + 1; });
          if (cb.checked) { list.push(i + 1); list.sort(); }
          step.weekdays = list; changed(false);
        });
        days.appendChild(el("label", { className: "check" }, [cb, " " + d]));
      });
      out.push(days);
    }
    if (step.type === "wait_event") {
      out.push(field("Event", input(step.event, set("event"), { list: "journey-events" }), "f-event", "event"));
      out.push(field("Timeout", input(step.timeout, set("timeout"), { placeholder: "3d" }), "f-timeout", "timeout"));
    }
    if (step.type === "branch") { out.push(branchCases(sid, step)); }
    if (step.type === "split") { out.push(splitVariants(sid, step)); }
    if (step.type === "update") {
      out.push(field("Action", select([["set_field", "Set a field"], ["subscribe_topic", "Subscribe to a topic"],
                                       ["unsubscribe_topic", "Unsubscribe from a topic"]], step.action, function (v) {
        step.action = v;
        if (v === "set_field") { delete step.topic_id; step.field = step.field || ""; step.value = step.value || ""; }
        else { delete step.field; delete step.value; step.topic_id = step.topic_id || null; }
        changed(false); showPanel();
      }), "f-action", "action"));
      if (step.action === "set_field") {
        out.push(field("Field", select(choices.update_fields || choices.attribute_fields || [], step.field, set("field"), "— choose —"), "f-field", "update-field"));
        out.push(field("Value", input(step.value, set("value")), "f-value", "update-value"));
      } else {
        out.push(field("Topic", select((choices.topics || []).map(function (t) { return [t.id, t.name]; }), step.topic_id,
                                       set("topic_id"), "— choose —"), "f-topic", "update-topic"));
      }
    }
    if (step.type === "notify") {
      out.push(field("Role", select(choices.roles || [], step.role, set("role")), "f-role", "notify-role"));
      var ta = el("textarea", { rows: "3", maxlength: "500" });
      ta.value = step.text || "";
      ta.addEventListener("change", function () { step.text = ta.value; changed(false); });
      out.push(field("Notice text (plain text; no patient data, no merge fields)", ta, "f-text", "notify-text"));
    }
    if (step.type === "webhook") {
      out.push(field("Webhook event", input(step.event, set("event")), "f-webhook", "webhook-event",
                     "Sent through the organization's webhook endpoints; ids only."));
    }
    if (step.type !== "exit") { out.push(nextPickers(sid, step)); }
    if (!readonly) {
      var actions = el("div", { className: "actions" });
      if (def.start !== sid) {
        var mk = el("button", { type: "button", className: "btn secondary small", text: "Make start step", "data-testid": "make-start" });
        mk.addEventListener("click", function () { def.start = sid; changed(true); showPanel(); });
        actions.appendChild(mk);
      }
      var del = el("button", { type: "button", className: "btn danger small", text: "Delete step", "data-testid": "delete-step" });
      del.addEventListener("click", function () { removeStep(sid); });
      actions.appendChild(del);
      var back = el("button", { type: "button", className: "btn link", text: "Journey settings", "data-testid": "show-settings" });
      back.addEventListener("click", function () { selected = null; showPanel(); });
      actions.appendChild(back);
      out.push(actions);
    }
    return out;
  }

  function branchCases(sid, step) {
    var box = el("fieldset", { className: "cases" }, [el("legend", { text: "Cases (first match wins; otherwise the default)" })]);
    (step.cases || []).forEach(function (c, i) {
      var when = c.when = c.when || { kind: "attribute" };
      var row = el("div", { className: "case", "data-testid": "branch-case" }, [el("strong", { text: "Case " + (i + 1) })]);
      var p = "c" + i + "-";
      row.appendChild(field("Condition", select([["attribute", "Contact field"], ["segment", "Segment membership"],
                                                 ["engagement", "Engagement with a send step"]], when.kind, function (v) {
        c.when = v === "attribute" ? { kind: v, field: "", op: "eq", value: "" } :
          v === "segment" ? { kind: v, segment_id: null } : { kind: v, step: "", is: "opened" };
        changed(false); showPanel();
      }), p + "kind", "case-kind"));
      var upd = function (k) { return function (v) { when[k] = v === "" ? null : v; changed(false); }; };
      if (when.kind === "attribute") {
        row.appendChild(field("Field", select(choices.attribute_fields || [], when.field, upd("field"), "— choose —"), p + "field", "case-field"));
        row.appendChild(field("Operator", select(OPS, when.op, upd("op")), p + "op", "case-op"));
        row.appendChild(field("Value", input(when.value, upd("value")), p + "value", "case-value"));
      } else if (when.kind === "segment") {
        row.appendChild(field("Segment", select((choices.segments || []).map(function (s) { return [s.id, s.name]; }),
                                                when.segment_id, upd("segment_id"), "— choose —"), p + "segment", "case-segment"));
      } else {
        var sends = Object.keys(def.steps).filter(function (s) { return def.steps[s].type === "send"; });
        row.appendChild(field("Send step", select(sends, when.step, upd("step"), "— choose —"), p + "step", "case-step"));
        row.appendChild(field("Is", select(ENGAGEMENT, when.is, upd("is")), p + "is", "case-is"));
      }
      if (!readonly) {
        var rm = el("button", { type: "button", className: "btn link", text: "Remove case", "data-testid": "remove-case" });
        rm.addEventListener("click", function () { step.cases.splice(i, 1); changed(true); showPanel(); });
        row.appendChild(rm);
      }
      box.appendChild(row);
    });
    if (!readonly) {
      var add = el("button", { type: "button", className: "btn secondary small", text: "Add case", "data-testid": "add-case" });
      add.addEventListener("click", function () {
        step.cases = step.cases || [];
        step.cases.push({ when: { kind: "attribute", field: "", op: "eq", value: "" }, next: null });
        changed(true); showPanel();
      });
      box.appendChild(add);
    }
    return box;
  }

  function splitVariants(sid, step) {
    var box = el("fieldset", { className: "variants" }, [el("legend", { text: "Variants (weights add up to 100)" })]);
    var total = 0;
    (step.variants || []).forEach(function (v, i) {
      total += Number(v.weight) || 0;
      var row = el("div", { className: "variant inline-fields", "data-testid": "split-variant" });
      row.appendChild(field("Name", input(v.name, function (x) { v.name = x; changed(true); showPanel(); }), "v" + i + "-name", "variant-name"));
      row.appendChild(field("Weight %", input(v.weight, function (x) {
        var n = parseInt(x, 10); v.weight = isNaN(n) ? x : n; changed(false); showPanel();
      }, { inputmode: "numeric" }), "v" + i + "-weight", "variant-weight"));
      if (!readonly && step.variants.length > 2) {
        var rm = el("button", { type: "button", className: "btn link", text: "Remove" });
        rm.addEventListener("click", function () { step.variants.splice(i, 1); changed(true); showPanel(); });
        row.appendChild(rm);
      }
      box.appendChild(row);
    });
    box.appendChild(el("p", { className: total === 100 ? "hint" : "field-error", text: "Total: " + total + "%", "data-testid": "split-total" }));
    if (!readonly) {
      var add = el("button", { type: "button", className: "btn secondary small", text: "Add variant" });
      add.addEventListener("click", function () {
        step.variants.push({ name: String.fromCharCode(65 + step.variants.length), weight: 0, next: null });
        changed(true); showPanel();
      });
      box.appendChild(add);
    }
    return box;
  }

  function settingsPanel() {
    var out = [el("h2", { text: "Journey settings", "data-testid": "panel-title" })];
    out.push(errorList(errors.filter(function (e) { return !e.step; })));
    out.push(field("Purpose", select(Object.keys(choices.purposes || {}).map(function (k) { return [k, choices.purposes[k]]; }),
                                     def.purpose, function (v) { def.purpose = v; changed(false); }), "f-purpose", "journey-purpose",
                   "Marketing purposes need compliance approval to publish."));
    out.push(field("Subscription topic", select((choices.topics || []).map(function (t) { return [t.id, t.name]; }), def.topic_id,
                                                function (v) { def.topic_id = v || null; changed(false); }, "— none —"), "f-topic_id", "journey-topic"));
    var entry = def.entry = def.entry || { type: "event", event: "" };
    var eb = el("fieldset", {}, [el("legend", { text: "Entry" })]);
    eb.appendChild(field("Patients enter on", select([["event", "An event"], ["segment", "Joining a segment"], ["date", "A date"]], entry.type, function (v) {
      def.entry = v === "event" ? { type: v, event: (choices.events || [""])[0] } : v === "segment" ? { type: v, segment_id: null } :
        { type: v, field: (choices.date_fields || ["appointment.start"])[0], offset: "-2d" };
      changed(false); showPanel();
    }), "f-entry-type", "entry-type"));
    var eset = function (k) { return function (v) { entry[k] = v === "" ? null : v; changed(false); }; };
    if (entry.type === "event") {
      eb.appendChild(field("Event", input(entry.event, eset("event"), { list: "journey-events" }), "f-entry-event", "entry-event"));
    } else if (entry.type === "segment") {
      eb.appendChild(field("Segment", select((choices.segments || []).map(function (s) { return [s.id, s.name]; }), entry.segment_id,
                                             eset("segment_id"), "— choose —"), "f-entry-segment", "entry-segment",
                           data.segment_hint ? "Suggested: " + data.segment_hint : null));
    } else {
      eb.appendChild(field("Date field", select(choices.date_fields || [], entry.field, eset("field")), "f-entry-field", "entry-field"));
      eb.appendChild(field("Offset", input(entry.offset, eset("offset"), { placeholder: "-48h" }), "f-entry-offset", "entry-offset",
                           "Before (-) or after (+) the date: -48h, -7d, +6mo, 0d"));
      eb.appendChild(field("At local time", input(entry.at, eset("at"), { placeholder: "09:00" }), "f-entry-at", "entry-at"));
      var ann = el("input", { type: "checkbox", id: "f-entry-anniversary", checked: !!entry.anniversary, disabled: readonly });
      ann.addEventListener("change", function () { entry.anniversary = ann.checked; changed(false); });
      eb.appendChild(el("label", { className: "check" }, [ann, " Every year (anniversary)"]));
    }
    out.push(eb);
    var re = def.reentry = def.reentry || { mode: "never" };
    var rb = el("fieldset", {}, [el("legend", { text: "Re-entry" })]);
    rb.appendChild(field("A patient may enter again", select([["never", "Never"], ["after", "After some days"], ["always", "Always"]], re.mode,
                                                            function (v) { re.mode = v; if (v === "after") { re.days = re.days || 30; } else { delete re.days; } changed(false); showPanel(); }),
                         "f-reentry", "reentry-mode"));
    if (re.mode === "after") {
      rb.appendChild(field("Days", input(re.days, function (v) { var n = parseInt(v, 10); re.days = isNaN(n) ? v : n; changed(false); }, { inputmode: "numeric" }),
                           "f-reentry-days", "reentry-days"));
    }
    out.push(rb);
    var gb = el("fieldset", {}, [el("legend", { text: "Goal (ends the run, counted as a conversion)" })]);
    var goal = def.goal || null;
    gb.appendChild(field("Goal event", input(goal ? goal.event : "", function (v) {
      if (!v) { delete def.goal; } else { def.goal = def.goal || { within_days: 30 }; def.goal.event = v; }
      changed(false); showPanel();
    }, { list: "journey-events", placeholder: "none" }), "f-goal-event", "goal-event"));
    if (goal) {
      gb.appendChild(field("Within days", input(goal.within_days, function (v) { var n = parseInt(v, 10); def.goal.within_days = isNaN(n) ? v : n; changed(false); },
                                                { inputmode: "numeric" }), "f-goal-days", "goal-days"));
    }
    out.push(gb);
    var xb = el("fieldset", {}, [el("legend", { text: "Exit when the patient…" })]);
    [["unsubscribe", "unsubscribes"], ["revocation", "revokes an authorization"]].forEach(function (pair) {
      var cb = el("input", { type: "checkbox", checked: (def.exit_on || []).indexOf(pair[0]) >= 0, disabled: true });
      xb.appendChild(el("label", { className: "check" }, [cb, " " + pair[1]]));
    });
    xb.appendChild(el("p", { className: "hint", text: "Always honoured." }));
    out.push(xb);
    return out;
  }

  // Steps can be chosen by keyboard too (the canvas needs a pointer).
  function stepChooser() {
    var s = el("select", { id: "f-choose-step", "data-testid": "choose-step", "aria-label": "Show a step" });
    s.appendChild(el("option", { value: "", text: "Journey settings", selected: !selected }));
    Object.keys(def.steps).forEach(function (sid) {
      s.appendChild(el("option", { value: sid, text: sid + " — " + (TYPES[def.steps[sid].type] || def.steps[sid].type),
                                   selected: sid === selected }));
    });
    s.addEventListener("change", function () { selected = s.value || null; draw(); showPanel(); });
    return el("div", { className: "field step-chooser" }, [el("label", { "for": "f-choose-step", text: "Show" }), s]);
  }

  function showPanel() {
    panel.textContent = "";
    var items = [stepChooser()].concat(selected && def.steps[selected] ? stepPanel(selected) : settingsPanel());
    items.forEach(function (x) { if (x) { panel.appendChild(x); } });
  }

  // ------------------------------------------------------------------ validation

  var errorBox = document.getElementById("journey-errors");
  var statusOut = document.getElementById("validation-status");

  function scheduleValidate() {
    if (readonly || !urls.validate) { return; }
    clearTimeout(validateTimer);
    validateTimer = setTimeout(validate, 350);
  }

  function validate() {
    var serial = ++validateSerial;
    statusOut.textContent = "Checking…";
    statusOut.className = "badge";
    return api("POST", urls.validate, { definition: def }).then(function (res) {
      if (serial !== validateSerial) { return; }
      errors = res.errors || [];
      showErrors();
    }).catch(function (err) {
      if (serial !== validateSerial) { return; }
      errors = [{ path: null, step: null, message: err.message }];
      showErrors();
    });
  }

  function showErrors() {
    errorBox.textContent = "";
    statusOut.textContent = errors.length ? errors.length + " problem(s)" : "Valid";
    statusOut.className = "badge " + (errors.length ? "danger" : "ok");
    statusOut.setAttribute("data-valid", errors.length ? "false" : "true");
    errors.forEach(function (e) {
      var li = el("li", { "data-testid": "validation-error" }, [e.path ? el("code", { text: e.path }) : null, " " + e.message]);
      if (e.step && def.steps[e.step]) {
        var b = el("button", { type: "button", className: "btn link", text: "Show step" });
        b.addEventListener("click", function () { selected = e.step; draw(); showPanel(); });
        li.appendChild(b);
      }
      errorBox.appendChild(li);
    });
    refreshNodes();
    showPanel();
  }

  // ------------------------------------------------------------------ saving

  var nameInput = document.getElementById("journey-name");
  var saveBtn = document.getElementById("save-draft");
  var saveOut = document.getElementById("save-status");
  var publishForm = document.getElementById("publish-form");

  function updateSaveState() {
    if (saveOut && dirty) { saveOut.textContent = "Unsaved changes"; saveOut.setAttribute("data-state", "dirty"); }
  }

  function save() {
    var body = { name: nameInput ? nameInput.value : "", definition: def };
    saveOut.textContent = "Saving…";
    saveOut.setAttribute("data-state", "saving");
    return api("POST", urls.save, body).then(function (res) {
      dirty = false;
      if (!journeyId) {
        window.location.assign(res.edit_url + "?saved=1");
        return res;
      }
      saveOut.textContent = "Draft saved (version " + res.version + ")";
      saveOut.setAttribute("data-state", "saved");
      if (res.errors) { errors = res.errors; showErrors(); }
      return res;
    }).catch(function (err) {
      saveOut.textContent = err.message;
      saveOut.setAttribute("data-state", "error");
      if (err.detail && err.detail.problems) {
        errors = err.detail.problems;
        showErrors();
      } else if (err.detail && err.detail.field) {
        errors = [{ path: err.detail.field, step: stepOfPath(err.detail.field), message: err.detail.message }];
        showErrors();
      }
      throw err;
    });
  }

  function stepOfPath(path) {
    var m = /^(?:definition\.)?steps\.([^.[]+)/.exec(path || "");
    return m ? m[1] : null;
  }

  if (saveBtn) { saveBtn.addEventListener("click", function () { save().catch(function () {}); }); }
  if (nameInput) { nameInput.addEventListener("input", function () { dirty = true; updateSaveState(); }); }
  if (publishForm) {
    publishForm.addEventListener("submit", function (e) {
      if (!dirty) { return; }
      e.preventDefault();
      save().then(function () { publishForm.submit(); }).catch(function () {});
    });
  }
  window.addEventListener("beforeunload", function (e) { if (dirty && !readonly) { e.preventDefault(); e.returnValue = ""; } });

  var zoomBox = document.getElementById("journey-zoom");
  if (zoomBox) {
    zoomBox.addEventListener("click", function (e) {
      var b = e.target.closest("[data-zoom]");
      if (!b) { return; }
      var how = b.getAttribute("data-zoom");
      if (how === "in") { editor.zoom_in(); } else if (how === "out") { editor.zoom_out(); }
      else { editor.zoom = 1; editor.zoom_refresh(); editor.canvas_x = 0; editor.canvas_y = 0; editor.zoom_refresh(); fit(); }
    });
  }

  var palette = document.getElementById("journey-palette");
  if (palette) {
    palette.addEventListener("click", function (e) {
      var b = e.target.closest("[data-add-step]");
      if (b) { addStep(b.getAttribute("data-add-step")); }
    });
  }

  // ------------------------------------------------------------------ the running view's counts

  function fmt(n) { return n == null ? "0" : String(n); }

  function showCounts() {
    var t = counts.totals || {};
    Object.keys(t).forEach(function (k) {
      var out = document.querySelector("[data-total='" + k + "']");
      if (out && typeof t[k] !== "object") { out.textContent = fmt(t[k]); }
    });
    var reasons = document.getElementById("exit-reasons");
    if (reasons) {
      reasons.textContent = "";
      var ex = t.exited_by_reason || {};
      Object.keys(ex).sort().forEach(function (r) {
        reasons.appendChild(el("li", { "data-testid": "exit-reason" }, [r + ": ", el("span", { text: fmt(ex[r]) })]));
      });
      if (!Object.keys(ex).length) { reasons.appendChild(el("li", { className: "hint", text: "None yet." })); }
    }
    var body = document.getElementById("step-counts");
    if (body) {
      body.textContent = "";
      Object.keys(def.steps).forEach(function (sid) {
        var c = (counts.steps || {})[sid] || {};
        var m = c.messages || {};
        body.appendChild(el("tr", { "data-testid": "step-count-row", "data-step": sid }, [
          el("td", {}, [el("code", { text: sid })]), el("td", { text: TYPES[def.steps[sid].type] || def.steps[sid].type }),
          el("td", { className: "num", "data-testid": "count-now-" + sid, text: fmt(c.now) }),
          el("td", { className: "num", "data-testid": "count-executed-" + sid, text: fmt(c.executed) }),
          el("td", { className: "num", text: def.steps[sid].type === "send" ? fmt(m.sent) : "" }),
          el("td", { className: "num", text: def.steps[sid].type === "send" ? fmt(m.excluded) : "" }),
          el("td", { className: "num", text: def.steps[sid].type === "send" ? fmt(m.opened_human) : "" }),
          el("td", { className: "num", text: def.steps[sid].type === "send" ? fmt(m.clicked_human) : "" })
        ]));
      });
    }
    var stamp = document.getElementById("counts-updated");
    if (stamp) { stamp.textContent = counts.at || ""; stamp.setAttribute("data-refreshes", String((Number(stamp.getAttribute("data-refreshes")) || 0) + 1)); }
    refreshNodes();
  }

  function poll() {
    api("GET", urls.counts).then(function (res) { counts = res; showCounts(); })
      .catch(function () {})
      .then(function () { setTimeout(poll, data.poll_ms || 4000); });
  }

  // A whole journey fits the canvas when the page opens (Ctrl + wheel zooms, dragging the
  // background pans).
  function fit() {
    var maxX = 0, maxY = 0;
    Object.keys(def.layout).forEach(function (sid) {
      maxX = Math.max(maxX, def.layout[sid].x + 240);
      maxY = Math.max(maxY, def.layout[sid].y + 150);
    });
    if (!maxX || !canvas.clientWidth) { return; }
    var z = Math.min(1, canvas.clientWidth / maxX, canvas.clientHeight / maxY);
    if (z >= 1) { return; }
    z = Math.max(0.35, z);
    editor.zoom = z;
    editor.zoom_refresh();
    // Drawflow scales about the canvas' centre: move the origin back to the top left corner.
    editor.canvas_x = -canvas.clientWidth / 2 * (1 - z);
    editor.canvas_y = -canvas.clientHeight / 2 * (1 - z);
    editor.precanvas.style.transform = "translate(" + editor.canvas_x + "px, " + editor.canvas_y + "px) scale(" + z + ")";
  }

  // ------------------------------------------------------------------ start

  var dl = el("datalist", { id: "journey-events" });
  (choices.events || []).forEach(function (ev) { dl.appendChild(el("option", { value: ev })); });
  root.appendChild(dl);
  if (data.counts) { counts = data.counts; }
  draw();
  fit();
  showPanel();
  if (counts) { showCounts(); }
  if (readonly && urls.counts) { setTimeout(poll, data.poll_ms || 4000); }
  if (!readonly) { validate(); }
  root.setAttribute("data-ready", "true");
}());
