// The form builder: add, remove and move field rows in place, and show only the settings that
// apply to each row's type. Without this script the builder still works (server round trips).
(function () {
  "use strict";
  document.documentElement.classList.add("has-js");
  function uid() { return Math.random().toString(16).slice(2, 10); }
  function syncType(row) {
    var select = row.querySelector(".row-type");
    if (select) { row.dataset.type = select.value; }
  }
  document.addEventListener("DOMContentLoaded", function () {
    var rows = document.getElementById("builder-rows");
    var template = document.getElementById("builder-row-template");
    var add = document.getElementById("add-field");
    if (!rows || !template) { return; }
    Array.prototype.forEach.call(rows.querySelectorAll(".builder-row"), syncType);
    if (add) {
      add.addEventListener("click", function (evt) {
        evt.preventDefault();
        var html = template.innerHTML.split("__UID__").join(uid());
        var holder = document.createElement("div");
        holder.innerHTML = html;
        var row = holder.querySelector(".builder-row");
        rows.appendChild(row);
        syncType(row);
        var first = row.querySelector(".row-type");
        if (first) { first.focus(); }
      });
    }
    rows.addEventListener("change", function (evt) {
      if (evt.target.classList.contains("row-type")) { syncType(evt.target.closest(".builder-row")); }
    });
    rows.addEventListener("click", function (evt) {
      var btn = evt.target.closest("button");
      if (!btn) { return; }
      var row = btn.closest(".builder-row");
      if (btn.classList.contains("row-remove")) {
        var next = row.nextElementSibling || row.previousElementSibling;
        row.remove();
        if (next) { var f = next.querySelector(".row-type"); if (f) { f.focus(); } }
      } else if (btn.classList.contains("row-up") && row.previousElementSibling) {
        rows.insertBefore(row, row.previousElementSibling); btn.focus();
      } else if (btn.classList.contains("row-down") && row.nextElementSibling) {
        rows.insertBefore(row.nextElementSibling, row); btn.focus();
      }
    });
  });
})();
