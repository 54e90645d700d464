// The sender console's signing: the server gives the exact bytes of the message; this
// page signs them with the sender key file chosen here (WebCrypto Ed25519), so the key
// never leaves the browser. The key file is what `herald-server sender keygen` wrote:
// the 32-byte seed in hex.
"use strict";
(function () {
  const form = document.getElementById("compose");
  if (!form) {
    return;
  }
  const status = document.getElementById("compose-status");
  // PKCS #8 wrapping of an Ed25519 seed (RFC 8410): a fixed prefix, then the seed.
  const PKCS8_PREFIX = [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65,
    0x70, 0x04, 0x22, 0x04, 0x20];
  const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  const toBase64 = (bytes) => btoa(String.fromCharCode(...bytes));

  async function signingKey() {
    const file = document.getElementById("key").files[0];
    if (!file) {
      throw new Error("Choose your sender key file.");
    }
    const hex = (await file.text()).trim();
    if (!/^[0-9a-fA-F]{64}$/.test(hex)) {
      throw new Error("That file is not a sender key (64 hex digits, from `herald-server sender keygen`).");
    }
    const pkcs8 = new Uint8Array(48);
    pkcs8.set(PKCS8_PREFIX);
    pkcs8.set(hex.match(/../g).map((h) => parseInt(h, 16)), 16);
    if (!window.crypto || !crypto.subtle) {
      throw new Error("This browser cannot sign here (no WebCrypto); use `herald-server message send` instead.");
    }
    try {
      return await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
    } catch (e) {
      throw new Error("This browser cannot sign with Ed25519; use a current browser or `herald-server message send`.");
    }
  }

  async function draft() {
    const fields = new URLSearchParams();
    for (const name of ["csrf", "title", "body", "link", "priority", "ttl"]) {
      fields.append(name, form.elements[name].value);
    }
    if (form.elements.advertising.checked) {
      fields.append("advertising", "on");
    }
    const answer = await fetch("/sender/draft", {
      method: "POST",
      body: fields,
      credentials: "same-origin",
    });
    let json = null;
    try {
      json = await answer.json();
    } catch (e) {
      throw new Error("The server did not answer (" + answer.status + "); reload the page and try again.");
    }
    if (!answer.ok) {
      throw new Error(json.error || "The server refused the message.");
    }
    return json;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "Signing…";
    try {
      const key = await signingKey();
      const message = await draft();
      const signature = await crypto.subtle.sign({ name: "Ed25519" }, key, fromBase64(message.to_sign));
      form.elements.draft.value = message.draft;
      form.elements.signature.value = toBase64(new Uint8Array(signature));
      // A disabled field is not sent: the key file stays here.
      document.getElementById("key").disabled = true;
      status.textContent = "Sending…";
      form.submit();
    } catch (e) {
      status.textContent = e.message;
    }
  });
})();
