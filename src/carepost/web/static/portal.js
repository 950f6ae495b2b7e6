// Secure portal: size the sandboxed message frame to its content (the frame runs no script;
// allow-same-origin lets this page read its height).
(function () {
  function fit(frame) {
    try {
      var doc = frame.contentDocument;
      if (doc && doc.documentElement) {
        frame.style.height = (doc.documentElement.scrollHeight + 24) + "px";
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
