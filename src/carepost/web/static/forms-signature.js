// Drawn signature for hosted forms: a canvas whose drawing is kept as a PNG data URL in the
// hidden input named by data-signature-for. The typed name is always the accessible
// alternative (a canvas cannot be used with a keyboard); drawing is optional.
(function () {
  "use strict";
  document.documentElement.classList.add("has-js");
  function setup(pad) {
    var canvas = pad.querySelector("canvas");
    var input = document.getElementById(pad.dataset.signatureFor);
    var clear = pad.querySelector(".sig-clear");
    if (!canvas || !input || !canvas.getContext) { return; }
    var ctx = canvas.getContext("2d");
    ctx.lineWidth = 2.5; ctx.lineCap = "round"; ctx.lineJoin = "round"; ctx.strokeStyle = "#101828";
    var drawing = false, drawn = false;
    function point(evt) {
      var r = canvas.getBoundingClientRect();
      return { x: (evt.clientX - r.left) * canvas.width / r.width, y: (evt.clientY - r.top) * canvas.height / r.height };
    }
    canvas.addEventListener("pointerdown", function (evt) {
      drawing = true; var p = point(evt); ctx.beginPath(); ctx.moveTo(p.x, p.y);
      canvas.setPointerCapture(evt.pointerId); evt.preventDefault();
    });
    canvas.addEventListener("pointermove", function (evt) {
      if (!drawing) { return; }
      var p = point(evt); ctx.lineTo(p.x, p.y); ctx.stroke(); drawn = true;
    });
    function finish() {
      if (!drawing) { return; }
      drawing = false;
      if (drawn) { input.value = canvas.toDataURL("image/png"); }
    }
    canvas.addEventListener("pointerup", finish);
    canvas.addEventListener("pointercancel", finish);
    if (clear) {
      clear.addEventListener("click", function () {
        ctx.clearRect(0, 0, canvas.width, canvas.height); input.value = ""; drawn = false;
      });
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    var pads = document.querySelectorAll("[data-signature-for]");
    for (var i = 0; i < pads.length; i++) { setup(pads[i]); }
  });
})();
