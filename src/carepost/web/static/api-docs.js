// Interactive API reference at /api/docs: Swagger UI served by CarePost itself (no CDN).
// The validator badge is off: it would send the API description to validator.swagger.io.
(function () {
  "use strict";
  function start() {
    var root = document.getElementById("swagger-ui");
    if (!root || typeof window.SwaggerUIBundle !== "function") { return; }
    window.ui = window.SwaggerUIBundle({
      url: root.getAttribute("data-openapi-url"),
      domNode: root,
      validatorUrl: null,
      deepLinking: true,
      displayRequestDuration: true,
      persistAuthorization: false,
      withCredentials: false,
      presets: [window.SwaggerUIBundle.presets.apis],
      layout: "BaseLayout"
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
