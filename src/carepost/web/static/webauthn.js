// WebAuthn ceremonies for the security page (register a key) and the sign-in challenge (use a key).
// Loaded as a static file: the CSP forbids inline script. Binary fields travel as base64url.
(function () {
  "use strict";
  function b64urlToBuf(s) {
    s = s.replace(/-/g, "+").replace(/_/g, "/");
    while (s.length % 4) { s += "="; }
    var bin = atob(s), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) { out[i] = bin.charCodeAt(i); }
    return out.buffer;
  }
  function bufToB64url(buf) {
    var bytes = new Uint8Array(buf), bin = "";
    for (var i = 0; i < bytes.length; i++) { bin += String.fromCharCode(bytes[i]); }
    return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function post(url, body) {
    return fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": document.body.dataset.csrfToken || ""},
      body: JSON.stringify(body || {})
    }).then(function (r) {
      return r.json().then(function (data) {
        if (!r.ok) { var e = new Error((data.error && data.error.message) || "The request failed."); e.data = data; throw e; }
        return data;
      });
    });
  }
  function showError(msg) {
    var el = document.getElementById("webauthn-error");
    if (el) { el.textContent = msg; el.hidden = false; }
  }
  function register(btn) {
    if (!window.PublicKeyCredential) { showError("This browser does not support security keys."); return; }
    post(btn.dataset.optionsUrl).then(function (o) {
      o.challenge = b64urlToBuf(o.challenge);
      o.user.id = b64urlToBuf(o.user.id);
      (o.excludeCredentials || []).forEach(function (c) { c.id = b64urlToBuf(c.id); });
      return navigator.credentials.create({publicKey: o});
    }).then(function (cred) {
      var nameInput = document.getElementById("key-name");
      return post(btn.dataset.verifyUrl, {
        name: nameInput ? nameInput.value : "",
        credential: {
          id: cred.id, rawId: bufToB64url(cred.rawId), type: cred.type,
          response: {
            clientDataJSON: bufToB64url(cred.response.clientDataJSON),
            attestationObject: bufToB64url(cred.response.attestationObject),
            transports: cred.response.getTransports ? cred.response.getTransports() : []
          }
        }
      });
    }).then(function (res) { window.location.assign(res.redirect || window.location.pathname); })
      .catch(function (e) { showError(e.message || "The security key was not registered."); });
  }
  function authenticate(btn) {
    if (!window.PublicKeyCredential) { showError("This browser does not support security keys."); return; }
    post(btn.dataset.optionsUrl).then(function (o) {
      o.challenge = b64urlToBuf(o.challenge);
      (o.allowCredentials || []).forEach(function (c) { c.id = b64urlToBuf(c.id); });
      return navigator.credentials.get({publicKey: o});
    }).then(function (cred) {
      return post(btn.dataset.verifyUrl, {
        credential: {
          id: cred.id, rawId: bufToB64url(cred.rawId), type: cred.type,
          response: {
            clientDataJSON: bufToB64url(cred.response.clientDataJSON),
            authenticatorData: bufToB64url(cred.response.authenticatorData),
            signature: bufToB64url(cred.response.signature),
            userHandle: cred.response.userHandle ? bufToB64url(cred.response.userHandle) : null
          }
        }
      });
    }).then(function (res) { window.location.assign(res.redirect || "/app"); })
      .catch(function (e) {
        if (e.data && e.data.redirect) { window.location.assign(e.data.redirect); return; }
        showError(e.message || "The security key was not accepted.");
      });
  }
  document.addEventListener("click", function (evt) {
    var reg = evt.target.closest("#webauthn-register");
    if (reg) { register(reg); return; }
    var auth = evt.target.closest("#webauthn-login");
    if (auth) { authenticate(auth); }
  });
})();
