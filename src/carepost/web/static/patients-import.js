// The import wizard: preview a CSV's headers, map columns, upload the file as the request body.
(function () {
  var wizard = document.getElementById("import-wizard");
  if (!wizard) { return; }
  var fileInput = document.getElementById("import-file");
  var formatSelect = document.getElementById("import-format");
  var csvStep = document.getElementById("csv-step");
  var rows = document.getElementById("mapping-rows");
  var detected = document.getElementById("csv-detected");
  var saved = document.getElementById("saved-mapping");
  var nameInput = document.getElementById("mapping-name");
  var start = document.getElementById("start-import");
  var errorBox = document.getElementById("import-error");
  var token = document.body.dataset.csrfToken;
  var options = document.getElementById(wizard.dataset.fieldsTemplate);

  function showError(message) { errorBox.textContent = message; errorBox.hidden = !message; }

  function isCsv(file) {
    var fmt = formatSelect.value;
    if (fmt !== "auto") { return fmt === "csv"; }
    return /\.(csv|txt)$/i.test(file.name);
  }

  function api(method, url, body, type) {
    var headers = { "X-CSRF-Token": token };
    if (type) { headers["Content-Type"] = type; }
    return fetch(url, { method: method, headers: headers, body: body, credentials: "same-origin" }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error((data.error && data.error.message) || "The request failed."); }
        return data;
      });
    });
  }

  function buildMapping(preview) {
    rows.textContent = "";
    preview.headers.forEach(function (header, i) {
      var tr = document.createElement("tr");
      var th = document.createElement("th");
      th.scope = "row";
      th.textContent = header;
      var td = document.createElement("td");
      var select = document.createElement("select");
      select.id = "map-" + i;
      select.dataset.header = header;
      select.setAttribute("aria-label", "CarePost field for " + header);
      select.appendChild(options.content.cloneNode(true));
      select.value = preview.suggested[header] || "ignore";
      td.appendChild(select);
      tr.appendChild(th);
      tr.appendChild(td);
      rows.appendChild(tr);
    });
    detected.textContent = "Detected: " + preview.encoding + ", delimiter " + JSON.stringify(preview.delimiter) +
      (preview.has_header ? ", with a header row" : ", no header row (columns are numbered)") + ".";
  }

  function onFileChosen() {
    showError("");
    var file = fileInput.files[0];
    start.disabled = !file;
    csvStep.hidden = true;
    if (!file || !isCsv(file)) { return; }
    api("POST", "/api/v1/imports/preview", file.slice(0, 65536), "text/csv").then(function (preview) {
      buildMapping(preview);
      csvStep.hidden = false;
    }).catch(function (e) { showError(e.message); });
  }

  function mappingId() {
    if (saved.value) { return Promise.resolve(saved.value); }
    var columns = {};
    rows.querySelectorAll("select").forEach(function (s) { columns[s.dataset.header] = s.value; });
    var name = nameInput.value.trim() || ("Mapping " + new Date().toISOString().slice(0, 19).replace("T", " "));
    return api("POST", "/api/v1/imports/mappings", JSON.stringify({ name: name, columns: columns }), "application/json")
      .then(function (m) { return m.id; });
  }

  function upload(mapping) {
    var file = fileInput.files[0];
    var params = new URLSearchParams({ format: isCsv(file) ? "csv" : formatSelect.value });
    if (mapping) { params.set("mapping_id", mapping); }
    var type = isCsv(file) ? "text/csv" : "application/octet-stream";
    return fetch("/api/v1/imports?" + params.toString(), {
      method: "POST", body: file, credentials: "same-origin",
      headers: { "X-CSRF-Token": token, "Content-Type": type, "X-Filename": file.name.slice(0, 255) }
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { throw new Error((data.error && data.error.message) || "The upload failed."); }
        window.location.assign("/app/imports/" + data.id);
      });
    });
  }

  fileInput.addEventListener("change", onFileChosen);
  formatSelect.addEventListener("change", onFileChosen);
  start.addEventListener("click", function () {
    var file = fileInput.files[0];
    if (!file) { return; }
    start.disabled = true;
    showError("");
    var step = isCsv(file) ? mappingId() : Promise.resolve(null);
    step.then(upload).catch(function (e) { showError(e.message); start.disabled = false; });
  });
})();
