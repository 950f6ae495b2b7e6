// Sends the CSRF token with every htmx request; forms carry it as a hidden field.
document.addEventListener("htmx:configRequest", function (evt) {
  var token = document.body.dataset.csrfToken;
  if (token) { evt.detail.headers["X-CSRF-Token"] = token; }
});
// Buttons that copy a value shown once (API secrets, setup links).
document.addEventListener("click", function (evt) {
  var btn = evt.target.closest("[data-copy-target]");
  if (!btn) { return; }
  var el = document.getElementById(btn.dataset.copyTarget);
  if (el && navigator.clipboard) { navigator.clipboard.writeText(el.textContent.trim()); btn.textContent = "Copied"; }
});
// Confirmation for destructive actions, without inline script (CSP forbids it).
document.addEventListener("submit", function (evt) {
  var msg = evt.target.dataset.confirm;
  if (msg && !window.confirm(msg)) { evt.preventDefault(); }
});
