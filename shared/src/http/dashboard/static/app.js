// kitebridge dashboard: refreshes the page's live region (#live) every few seconds, so build
// states and deployments move without a reload. Pages work without it.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch) return;
  var EVERY_MS = 2000;
  var busy = false;
  var stopped = false;

  function focusedInside() {
    var a = document.activeElement;
    return a && a !== document.body && live.contains(a);
  }

  function refresh() {
    if (busy || stopped || document.hidden || focusedInside()) return;
    busy = true;
    fetch(window.location.pathname + window.location.search, {
      headers: { "X-Kitebridge-Live": "1" },
      credentials: "same-origin",
      cache: "no-store",
      redirect: "error"
    })
      .then(function (r) {
        if (r.status === 401) {
          // The session ended: show the sign-in page on the next full load.
          stopped = true;
          window.location.reload();
          return null;
        }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined && html !== live.innerHTML && !focusedInside()) {
          live.innerHTML = html;
          live.setAttribute("data-refreshed", new Date().toISOString());
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { busy = false; });
  }

  window.setInterval(refresh, EVERY_MS);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
})();
