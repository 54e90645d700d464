// The directory page: polls /peers.json every few seconds and replaces the list, so
// devices appear and disappear without a reload. The page works without it.
(function () {
  "use strict";
  var PERIOD_MS = 3000;
  var list = document.getElementById("directory");
  if (!list || !window.fetch) { return; }
  var query = list.getAttribute("data-q") || "";
  function refresh() {
    fetch("/peers.json?q=" + encodeURIComponent(query), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (body) {
        if (body && typeof body.html === "string" && body.html !== list.innerHTML) {
          // The server renders and escapes the list (the same template as the page).
          list.innerHTML = body.html;
        }
        list.setAttribute("data-refreshed", String(Date.now()));
      })
      .catch(function () {})
      .then(function () { setTimeout(refresh, PERIOD_MS); });
  }
  setTimeout(refresh, PERIOD_MS);
})();
