// Live refresh: every few seconds, fetch this same page and swap in its [data-live] parts.
// The server renders everything; this only replaces elements (no state, no framework).
"use strict";
(function () {
  const EVERY_MS = 3000;
  if (!document.querySelector("[data-live]")) return;
  async function refresh() {
    if (!document.hidden) {
      try {
        const response = await fetch(location.href, {credentials: "same-origin", headers: {"X-Console-Refresh": "1"}});
        const type = response.headers.get("content-type") || "";
        if (response.ok && !response.redirected && type.startsWith("text/html")) {
          const page = new DOMParser().parseFromString(await response.text(), "text/html");
          for (const part of document.querySelectorAll("[data-live]")) {
            const fresh = page.getElementById(part.id);
            if (fresh) part.replaceWith(document.importNode(fresh, true));
          }
          document.body.dataset.refreshed = String(Date.now());
        }
      } catch (error) {
        // The service is restarting or the network blinked: the next round tries again.
      }
    }
    setTimeout(refresh, EVERY_MS);
  }
  setTimeout(refresh, EVERY_MS);
})();
