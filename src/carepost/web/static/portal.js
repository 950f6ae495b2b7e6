// Secure portal: size the sandboxed message frame to its content (the frame runs no script;
// allow-same-origin lets this page read its height).
(function () {
  function fit(frame) {
    try {
      var doc = frame.contentDocument;
      if (doc && doc.body) {
        // The body's own height (the document's is never less than the frame), plus its margins.
        frame.style.height = Math.ceil(doc.body.getBoundingClientRect().height + 28) + "px";
      }
    } catch (e) { /* leave the default height */ }
  }
  document.addEventListener("DOMContentLoaded", function () {
    var frames = document.querySelectorAll("iframe.portal-body-frame");
    Array.prototype.forEach.call(frames, function (frame) {
      frame.addEventListener("load", function () { fit(frame); });
      fit(frame);
      window.addEventListener("resize", function () { fit(frame); });
    });
  });
})();
