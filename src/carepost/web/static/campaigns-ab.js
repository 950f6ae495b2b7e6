// The campaign wizard's A/B/n variants: add and remove variant rows in place and keep each row's
// fields named ab_v<i>_<setting> with its letter. Without this script the Add and Remove buttons
// are ordinary submit buttons and the server adds or removes the row (a round trip).
(function () {
  "use strict";
  var KEYS = "ABCDEFGHIJ";
  document.addEventListener("DOMContentLoaded", function () {
    var rows = document.getElementById("ab-variants");
    var template = document.getElementById("ab-variant-template");
    var add = document.getElementById("ab-add");
    var enabled = document.getElementById("f-ab_enabled");
    if (!rows || !template || !add) { return; }
    var max = parseInt(rows.dataset.max, 10) || 10;
    var min = parseInt(rows.dataset.min, 10) || 2;

    function renumber() {
      var all = rows.querySelectorAll(".ab-variant");
      Array.prototype.forEach.call(all, function (row, i) {
        var key = KEYS.charAt(i);
        row.querySelector(".ab-key").textContent = key;
        Array.prototype.forEach.call(row.querySelectorAll("[data-setting]"), function (field) {
          field.name = "ab_v" + i + "_" + field.dataset.setting;
          field.id = "f-" + field.name;
        });
        Array.prototype.forEach.call(row.querySelectorAll("label[data-for]"), function (label) {
          label.htmlFor = "f-ab_v" + i + "_" + label.dataset.for;
        });
        var remove = row.querySelector(".ab-remove");
        remove.value = "remove_variant:" + i;
        remove.textContent = "Remove variant " + key;
        remove.disabled = all.length <= min;
      });
      add.disabled = all.length >= max;
    }

    add.addEventListener("click", function (evt) {
      evt.preventDefault();
      if (rows.querySelectorAll(".ab-variant").length >= max) { return; }
      var holder = document.createElement("div");
      holder.innerHTML = template.innerHTML;
      var row = holder.querySelector(".ab-variant");
      rows.appendChild(row);
      if (enabled) { enabled.checked = true; }
      renumber();
      row.querySelector("[data-setting]").focus();
    });
    rows.addEventListener("click", function (evt) {
      var remove = evt.target.closest(".ab-remove");
      if (!remove) { return; }
      evt.preventDefault();
      if (rows.querySelectorAll(".ab-variant").length <= min) { return; }
      remove.closest(".ab-variant").remove();
      renumber();
      add.focus();
    });
    renumber();
  });
})();
