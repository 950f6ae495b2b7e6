// The segment builder: a visual mode (nested groups of criteria) and a text mode (the segment
// language), kept in sync through POST /api/v1/segments/parse; a live count and breakdown through
// POST /api/v1/segments/count; code search inside value sets through GET /api/v1/value-sets.
(function () {
  "use strict";
  var root = document.getElementById("segment-builder");
  if (!root) { return; }
  var token = document.body.dataset.csrfToken;
  var visualRoot = document.getElementById("visual-root");
  var textArea = document.getElementById("query-text");
  var errorBox = document.getElementById("builder-error");
  var countOut = document.getElementById("live-count");
  var countNote = document.getElementById("count-note");
  var breakdownBy = document.getElementById("breakdown-by");
  var breakdownTable = document.getElementById("breakdown");
  var modeVisual = document.getElementById("mode-visual");
  var modeText = document.getElementById("mode-text");
  var visualMode = document.getElementById("visual-mode");
  var textMode = document.getElementById("text-mode");

  var UNITS = ["days", "weeks", "months", "years"];
  var QUALIFIERS = { condition: ["active", "resolved"], medication: ["active"], care_plan: ["active"],
                     appointment: ["upcoming", "missed", "fulfilled", "cancelled"] };
  var catalog = null;          // GET /api/v1/segments/fields
  var valueSets = [];          // GET /api/v1/value-sets
  var model = null;            // the visual tree: {kind: "group", op, negate, children} | {kind: "crit", ...}
  var seq = 0;
  var countTimer = null, textTimer = null, countSerial = 0;

  function api(method, url, body) {
    var headers = { "X-CSRF-Token": token, "Accept": "application/json" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    return fetch(url, { method: method, headers: headers, credentials: "same-origin",
                        body: body === undefined ? undefined : JSON.stringify(body) }).then(function (r) {
      if (r.status === 204) { return {}; }
      return r.json().then(function (data) {
        if (!r.ok) {
          var err = new Error((data.error && data.error.message) || "The request failed.");
          err.detail = data.error || {};
          throw err;
        }
        return data;
      });
    });
  }

  function showError(message) { errorBox.textContent = message || ""; errorBox.hidden = !message; }

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { e.textContent = attrs[k]; }
      else if (k === "className") { e.className = attrs[k]; }
      else { e.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { e.appendChild(c); } });
    return e;
  }

  function uid(prefix) { seq += 1; return prefix + "-" + seq; }

  function labelled(labelText, control) {
    var id = control.id || uid("f");
    control.id = id;
    return el("span", { className: "seg-field" }, [el("label", { "for": id, text: labelText }), control]);
  }

  function select(options, value) {
    var s = el("select");
    options.forEach(function (o) {
      var opt = el("option", { value: o[0], text: o[1] });
      if (o[0] === value) { opt.selected = true; }
      s.appendChild(opt);
    });
    return s;
  }

  // ------------------------------------------------------------------ the field picker

  function pickerOptions() {
    var groups = [["Demographic", []], ["Clinical", []], ["Journey", []], ["Engagement", []], ["Consent", []], ["Other", []]];
    var byName = {};
    groups.forEach(function (g) { byName[g[0]] = g[1]; });
    (catalog.demographic || []).forEach(function (f) {
      if (f.field && f.field.indexOf("<") < 0) { byName.Demographic.push(["field:" + f.field, f.field.replace(/_/g, " ")]); }
      if (f.criterion) { byName.Demographic.push(["text:" + f.example, f.example.replace(/ "[^"]*"$/, " (…)")]); }
    });
    (catalog.clinical || []).forEach(function (c) {
      if (c.criterion === "has") { byName.Clinical.push(["has:" + c.kind, "has " + c.kind.replace(/_/g, " ")]); }
      if (c.criterion === "last") { byName.Clinical.push(["last:observation", "last observation value"]); }
    });
    (catalog.journey || []).forEach(function (f) { if (f.field) { byName.Journey.push(["field:" + f.field, "care stage"]); } });
    (catalog.engagement || []).forEach(function (c) { byName.Engagement.push(["has:" + c.kind, c.kind.replace(/_/g, " ")]); });
    (catalog.consent || []).forEach(function (c) { byName.Consent.push(["text:" + c.example, c.criterion + " (…)"]); });
    byName.Other.push(["text:", "any criterion, as text"]);
    return groups;
  }

  function fieldInfo(name) {
    var all = (catalog.demographic || []).concat(catalog.journey || []);
    for (var i = 0; i < all.length; i++) { if (all[i].field === name) { return all[i]; } }
    return null;
  }

  function picker(value) {
    var s = el("select", { className: "seg-picker" });
    pickerOptions().forEach(function (g) {
      if (!g[1].length) { return; }
      var og = el("optgroup", { label: g[0] });
      g[1].forEach(function (o) {
        var opt = el("option", { value: o[0], text: o[1] });
        if (o[0] === value) { opt.selected = true; }
        og.appendChild(opt);
      });
      s.appendChild(og);
    });
    return s;
  }

  // ------------------------------------------------------------------ model <-> tree

  function newCrit(pick) {
    var kind = pick.split(":")[0], name = pick.slice(kind.length + 1);
    if (kind === "field") {
      var info = fieldInfo(name);
      return { kind: "crit", negate: false, pick: pick, field: name, op: (info && info.ops && info.ops[0]) || "=", value: "" };
    }
    if (kind === "has") { return { kind: "crit", negate: false, pick: pick, hasKind: name, qualifier: "", source: "valueset",
                                   valueset: "", codes: "", within: "", unit: "months", none: false }; }
    if (kind === "last") { return { kind: "crit", negate: false, pick: pick, source: "valueset", valueset: "", codes: "",
                                    op: ">", value: "", within: "", unit: "months" }; }
    return { kind: "crit", negate: false, pick: "text:", text: name, node: null };
  }

  function splitList(v) { return String(v).split(",").map(function (x) { return x.trim(); }).filter(Boolean); }

  function typed(info, v) {
    if (info && info.type === "number") { var n = Number(v); return isNaN(n) ? v : n; }
    if (info && info.type === "boolean") { return v === "true" ? true : v === "false" ? false : v; }
    return v;
  }

  function critToNode(c) {
    var node;
    var kind = c.pick.split(":")[0];
    if (kind === "field") {
      var info = fieldInfo(c.field);
      node = { type: "field", field: c.field, op: c.op };
      if (c.op === "between") {
        var parts = splitList(c.value);
        node.value = [typed(info, parts[0] || ""), typed(info, parts[1] || "")];
      } else if (c.op === "in" || c.op === "not in") {
        node.value = splitList(c.value).map(function (x) { return typed(info, x); });
      } else if (c.op !== "is empty" && c.op !== "is not empty") {
        node.value = typed(info, c.value);
      }
    } else if (kind === "has" || kind === "last") {
      node = kind === "has" ? { type: "has", kind: c.hasKind } : { type: "last", kind: "observation", op: c.op, value: Number(c.value) };
      if (kind === "has" && c.none) { node.count = ["=", 0]; }
      if (c.qualifier) { node.qualifier = c.qualifier; }
      if (c.source === "valueset" && c.valueset) { node.valueset = c.valueset; }
      if (c.source === "codes" && c.codes) { node.codes = splitList(c.codes); }
      if (c.within) { node.time = { within: [Number(c.within), c.unit] }; }
    } else {
      node = c.node;
    }
    if (!node) { return null; }
    return c.negate ? { not: node } : node;
  }

  function toTree(m) {
    if (m.kind === "group") {
      var kids = m.children.map(toTree).filter(Boolean);
      if (!kids.length) { return null; }
      var node = kids.length === 1 ? kids[0] : (m.op === "or" ? { or: kids } : { and: kids });
      return m.negate ? { not: node } : node;
    }
    return critToNode(m);
  }

  function fromNode(node, negate) {
    if (node.and || node.or) {
      return { kind: "group", op: node.or ? "or" : "and", negate: !!negate,
               children: (node.and || node.or).map(function (n) { return fromNode(n, false); }) };
    }
    if (node.not) {
      if (negate) { return { kind: "group", op: "and", negate: true, children: [fromNode(node.not, true)] }; }
      return fromNode(node.not, true);
    }
    var simpleTime = !node.time || (node.time.within && Object.keys(node.time).length === 1);
    if (node.type === "field" && fieldInfo(node.field) && !node.at) {
      var v = node.value;
      return { kind: "crit", negate: !!negate, pick: "field:" + node.field, field: node.field, op: node.op,
               value: Array.isArray(v) ? v.join(", ") : (v === undefined || v === null ? "" : String(v)) };
    }
    var countOk = !node.count || (node.count[0] === "=" && node.count[1] === 0);
    if (node.type === "has" && simpleTime && countOk && !(node.valueset && node.codes)) {
      return { kind: "crit", negate: !!negate, pick: "has:" + node.kind, hasKind: node.kind, qualifier: node.qualifier || "",
               source: node.codes ? "codes" : "valueset", valueset: node.valueset || "", codes: (node.codes || []).join(", "),
               within: node.time ? String(node.time.within[0]) : "", unit: node.time ? node.time.within[1] : "months",
               none: !!node.count };
    }
    if (node.type === "last" && simpleTime && !(node.valueset && node.codes)) {
      return { kind: "crit", negate: !!negate, pick: "last:observation", source: node.codes ? "codes" : "valueset",
               valueset: node.valueset || "", codes: (node.codes || []).join(", "), op: node.op, value: String(node.value),
               within: node.time ? String(node.time.within[0]) : "", unit: node.time ? node.time.within[1] : "months" };
    }
    var raw = { kind: "crit", negate: !!negate, pick: "text:", text: "", node: node };
    api("POST", "/api/v1/segments/parse", { tree: node }).then(function (r) { raw.text = r.text; render(); }, function () {});
    return raw;
  }

  // ------------------------------------------------------------------ rendering the visual mode

  function render() {
    visualRoot.textContent = "";
    visualRoot.appendChild(renderGroup(model, null, 0));
  }

  function changed(fromText) {
    if (!fromText) { syncText(); }
    scheduleCount();
  }

  function renderGroup(g, parent, depth) {
    var box = el("fieldset", { className: "seg-group", "data-depth": String(depth) });
    var legend = el("legend", { className: "seg-group-head" });
    var op = select([["and", "All of"], ["or", "Any of"]], g.op);
    op.setAttribute("aria-label", "Combine the criteria of this group");
    op.className = "seg-group-op";
    op.addEventListener("change", function () { g.op = op.value; changed(); });
    var neg = el("input", { type: "checkbox", className: "seg-group-not" });
    neg.checked = !!g.negate;
    neg.addEventListener("change", function () { g.negate = neg.checked; changed(); });
    legend.appendChild(op);
    legend.appendChild(el("label", { className: "seg-inline" }, [neg, document.createTextNode(" none of these (NOT)")]));
    if (parent) {
      var rm = el("button", { type: "button", className: "btn small link", text: "Remove group" });
      rm.addEventListener("click", function () { parent.children.splice(parent.children.indexOf(g), 1); render(); changed(); });
      legend.appendChild(rm);
    }
    box.appendChild(legend);
    var list = el("ol", { className: "seg-rows" });
    g.children.forEach(function (child) {
      var li = el("li");
      li.appendChild(child.kind === "group" ? renderGroup(child, g, depth + 1) : renderCrit(child, g));
      list.appendChild(li);
    });
    box.appendChild(list);
    var addPick = picker("field:age");
    addPick.setAttribute("aria-label", "Field for a new criterion");
    addPick.className = "seg-add-pick";
    var add = el("button", { type: "button", className: "btn small secondary seg-add-crit", text: "Add criterion" });
    add.addEventListener("click", function () { g.children.push(newCrit(addPick.value)); render(); changed(); });
    var addGroup = el("button", { type: "button", className: "btn small secondary seg-add-group", text: "Add group" });
    addGroup.addEventListener("click", function () {
      g.children.push({ kind: "group", op: g.op === "and" ? "or" : "and", negate: false, children: [] });
      render(); changed();
    });
    box.appendChild(el("div", { className: "seg-add" }, [addPick, add, addGroup]));
    return box;
  }

  function input(value, attrs) {
    var i = el("input", attrs || { type: "text" });
    i.value = value === undefined || value === null ? "" : value;
    return i;
  }

  function bind(control, c, key, rerender) {
    var evt = control.tagName === "SELECT" || control.type === "checkbox" ? "change" : "input";
    control.addEventListener(evt, function () {
      c[key] = control.type === "checkbox" ? control.checked : control.value;
      if (rerender) { render(); }
      changed();
    });
  }

  function codeSource(c, row) {
    var src = select([["valueset", "value set"], ["codes", "codes"]], c.source);
    bind(src, c, "source", true);
    row.appendChild(labelled("Codes from", src));
    if (c.source === "valueset") {
      var opts = [["", "any code"]].concat(valueSets.map(function (v) {
        return [v.key, v.name + (v.sensitive_category ? " (sensitive)" : "")];
      }));
      var vs = select(opts, c.valueset);
      vs.className = "seg-valueset";
      bind(vs, c, "valueset");
      row.appendChild(labelled("Value set", vs));
    } else {
      var codes = input(c.codes, { type: "text", placeholder: "loinc:4548-4, icd10:E11.*", className: "seg-codes" });
      bind(codes, c, "codes");
      row.appendChild(labelled("Codes", codes));
    }
  }

  function timeInputs(c, row) {
    var n = input(c.within, { type: "number", min: "1", max: "36500", className: "seg-within" });
    bind(n, c, "within");
    var unit = select(UNITS.map(function (u) { return [u, u]; }), c.unit);
    unit.className = "seg-unit";
    bind(unit, c, "unit");
    row.appendChild(labelled("Within (blank: ever)", n));
    row.appendChild(labelled("Unit", unit));
  }

  function renderCrit(c, parent) {
    var row = el("div", { className: "seg-crit" });
    var pick = picker(c.pick);
    pick.setAttribute("aria-label", "Field");
    pick.addEventListener("change", function () {
      var fresh = newCrit(pick.value);
      parent.children[parent.children.indexOf(c)] = fresh;
      render(); changed();
    });
    row.appendChild(pick);
    var kind = c.pick.split(":")[0];
    if (kind === "field") {
      var info = fieldInfo(c.field) || { ops: ["="] };
      var op = select(info.ops.map(function (o) { return [o, o]; }), c.op);
      op.className = "seg-op";
      bind(op, c, "op", true);
      row.appendChild(labelled("Operator", op));
      if (c.op !== "is empty" && c.op !== "is not empty") {
        var hint = c.op === "between" ? "50, 74" : (c.op === "in" || c.op === "not in") ? "a, b, c" : "";
        var v = input(c.value, { type: "text", placeholder: hint, className: "seg-value" });
        bind(v, c, "value");
        row.appendChild(labelled("Value", v));
      }
    } else if (kind === "has") {
      var none = el("input", { type: "checkbox", className: "seg-none" });
      none.checked = !!c.none;
      bind(none, c, "none");
      row.appendChild(el("label", { className: "seg-inline" }, [none, document.createTextNode(" has none")]));
      var quals = QUALIFIERS[c.hasKind];
      if (quals) {
        var q = select([["", "any"]].concat(quals.map(function (x) { return [x, x]; })), c.qualifier);
        bind(q, c, "qualifier");
        row.appendChild(labelled("Which", q));
      }
      if (["message_received", "message_delivered", "message_bounced", "portal_message_opened", "form_submitted"].indexOf(c.hasKind) < 0) {
        codeSource(c, row);
      }
      timeInputs(c, row);
    } else if (kind === "last") {
      codeSource(c, row);
      var lop = select(["=", "!=", "<", "<=", ">", ">="].map(function (o) { return [o, o]; }), c.op);
      bind(lop, c, "op");
      row.appendChild(labelled("Latest value", lop));
      var lv = input(c.value, { type: "number", step: "any", className: "seg-value" });
      bind(lv, c, "value");
      row.appendChild(labelled("Value", lv));
      timeInputs(c, row);
    } else {
      var t = input(c.text, { type: "text", className: "seg-raw", placeholder: "authorized for marketing" });
      t.addEventListener("change", function () {
        c.text = t.value;
        api("POST", "/api/v1/segments/parse", { text: t.value }).then(function (r) { c.node = r.tree; showError(""); changed(); },
          function (e) { showError(e.message); });
      });
      row.appendChild(labelled("Criterion", t));
    }
    var neg = el("input", { type: "checkbox", className: "seg-not" });
    neg.checked = !!c.negate;
    bind(neg, c, "negate");
    row.appendChild(el("label", { className: "seg-inline" }, [neg, document.createTextNode(" not")]));
    var rm = el("button", { type: "button", className: "btn small link", text: "Remove" });
    rm.addEventListener("click", function () { parent.children.splice(parent.children.indexOf(c), 1); render(); changed(); });
    row.appendChild(rm);
    return row;
  }

  // ------------------------------------------------------------------ text mode and sync

  // textVersion counts what was typed: an answer to an older request never overwrites newer typing
  var textVersion = 0;

  function syncText() {
    var tree = toTree(model);
    var v = textVersion;
    if (!tree) { textArea.value = ""; return; }
    api("POST", "/api/v1/segments/parse", { tree: tree }).then(function (r) {
      if (v !== textVersion) { return; }
      textArea.value = r.text;
      showError("");
    }, function (e) { if (v === textVersion) { showError(e.message); } });
  }

  function fromText(text, thenCount) {
    if (!text.trim()) { model = { kind: "group", op: "and", negate: false, children: [] }; render(); changed(true); return Promise.resolve(); }
    var v = textVersion;
    return api("POST", "/api/v1/segments/parse", { text: text }).then(function (r) {
      if (v !== textVersion) { return; }
      var m = fromNode(r.tree, false);
      model = m.kind === "group" && !m.negate ? m : { kind: "group", op: "and", negate: false, children: [m] };
      showError("");
      render();
      if (thenCount !== false) { changed(true); }
    }, function (e) {
      if (v !== textVersion) { return; }
      var d = e.detail || {};
      showError(e.message + (d.expected && d.expected.length ? " Expected: " + d.expected.slice(0, 8).join(", ") + "." : ""));
    });
  }

  textArea.addEventListener("input", function () {
    textVersion += 1;
    clearTimeout(textTimer);
    textTimer = setTimeout(function () { fromText(textArea.value); }, 400);
  });

  function setMode(text) {
    modeVisual.setAttribute("aria-pressed", text ? "false" : "true");
    modeText.setAttribute("aria-pressed", text ? "true" : "false");
    modeVisual.classList.toggle("secondary", text);
    modeText.classList.toggle("secondary", !text);
    visualMode.hidden = text;
    textMode.hidden = !text;
  }
  modeVisual.addEventListener("click", function () { setMode(false); });
  modeText.addEventListener("click", function () { setMode(true); syncText(); });

  // ------------------------------------------------------------------ live count and breakdown

  function scheduleCount() {
    clearTimeout(countTimer);
    countTimer = setTimeout(runCount, 300);
  }

  function runCount() {
    var tree = toTree(model);
    var serial = ++countSerial;
    if (!tree) { countOut.textContent = "—"; countOut.dataset.state = "empty"; breakdownTable.hidden = true; return; }
    countOut.dataset.state = "loading";
    var body = { query: tree };
    if (breakdownBy.value) { body.breakdown = breakdownBy.value; }
    api("POST", "/api/v1/segments/count", body).then(function (r) {
      if (serial !== countSerial) { return; }
      countOut.textContent = String(r.count);
      countOut.dataset.state = "done";
      countNote.textContent = (r.sensitive ? "Sensitive: " + r.sensitive_categories.join(", ") + ". " : "") +
        (typeof r.elapsed_ms === "number" ? "Counted in " + r.elapsed_ms + " ms." : "");
      var tbody = breakdownTable.querySelector("tbody");
      tbody.textContent = "";
      (r.breakdown || []).forEach(function (g) {
        tbody.appendChild(el("tr", {}, [el("td", { text: g.label || g.value || g.key || "—" }), el("td", { text: String(g.count) })]));
      });
      breakdownTable.hidden = !(r.breakdown && r.breakdown.length);
    }, function (e) {
      if (serial !== countSerial) { return; }
      countOut.textContent = "—";
      countOut.dataset.state = "error";
      showError(e.message);
    });
  }
  breakdownBy.addEventListener("change", scheduleCount);

  // ------------------------------------------------------------------ code search inside value sets

  var search = document.getElementById("code-search");
  var results = document.getElementById("code-results");
  var searchTimer = null;
  var KIND_BY_SYSTEM = { loinc: "observation", cvx: "immunization", rxnorm: "medication", cpt: "procedure" };
  search.addEventListener("input", function () {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(function () {
      var q = search.value.trim();
      results.textContent = "";
      if (q.length < 2) { return; }
      api("GET", "/api/v1/value-sets?q=" + encodeURIComponent(q)).then(function (r) {
        var needle = q.toLowerCase();
        r.data.slice(0, 10).forEach(function (vs) {
          var hits = vs.codes.filter(function (c) {
            return ((c.code || c.prefix || "") + " " + (c.display || "")).toLowerCase().indexOf(needle) >= 0;
          }).slice(0, 5);
          var li = el("li", { className: "seg-code-hit" });
          li.appendChild(el("strong", { text: vs.name + " (" + vs.key + ")" }));
          var ul = el("ul");
          hits.forEach(function (c) {
            ul.appendChild(el("li", { text: c.system + ":" + (c.code || c.prefix + "*") + (c.display ? " — " + c.display : "") }));
          });
          li.appendChild(ul);
          var first = vs.codes[0] || {};
          var kind = KIND_BY_SYSTEM[first.system] || (/screening|mammography/.test(vs.key) ? "procedure" : "condition");
          var use = el("button", { type: "button", className: "btn small secondary", text: "Add “has " + kind + " in " + vs.key + "”" });
          use.addEventListener("click", function () {
            var c = newCrit("has:" + kind);
            c.valueset = vs.key;
            model.children.push(c);
            render(); changed();
          });
          li.appendChild(use);
          results.appendChild(li);
        });
        if (!r.data.length) { results.appendChild(el("li", { text: "No value set holds that." })); }
      }, function (e) { showError(e.message); });
    }, 250);
  });

  // ------------------------------------------------------------------ saving

  var save = document.getElementById("save-segment");
  if (save) {
    save.addEventListener("click", function () {
      var status = document.getElementById("save-status");
      var tree = toTree(model);
      if (!tree) { showError("Add at least one criterion."); return; }
      var body = { name: document.getElementById("segment-name").value, description: document.getElementById("segment-description").value,
                   kind: document.getElementById("segment-kind").value, query: tree };
      var id = root.dataset.segmentId;
      api(id ? "PATCH" : "POST", id ? "/api/v1/segments/" + id : "/api/v1/segments", body).then(function (r) {
        status.textContent = "Saved.";
        if (!id && r.id) { root.dataset.segmentId = r.id; window.history.replaceState(null, "", "/app/segments/" + r.id); }
        showError("");
      }, function (e) { status.textContent = ""; showError(e.message); });
    });
  }

  // ------------------------------------------------------------------ start

  Promise.all([api("GET", "/api/v1/segments/fields"), api("GET", "/api/v1/value-sets")]).then(function (r) {
    catalog = r[0];
    valueSets = r[1].data;
    model = { kind: "group", op: "and", negate: false, children: [] };
    var initial = root.dataset.queryText || "";
    if (initial) {
      textArea.value = initial;
      fromText(initial);
    } else {
      render();
    }
    root.dataset.ready = "yes";
  }, function (e) { showError(e.message); });
})();
