/* devserver dashboard: live refresh and copy buttons. Hand-written; no build step, no CDN.
 *
 * The server marks the parts of a page that change with `data-live` (and an id) and says on
 * <body data-live-ms> how often to look again (0: never, e.g. a finished run). This script
 * re-fetches the page it is on and swaps each region whose HTML changed, so the HTML is written
 * in one place only: the server's templates. It waits while the tab is hidden, backs off while
 * the server is unreachable, and reloads the whole page when the page's status changes (an
 * unknown session that now exists, for example).
 */
(function () {
  "use strict";

  var body = document.body;
  var statusEl = document.getElementById("live-status");
  var toggle = document.getElementById("live-toggle");
  var timer = null;
  var inFlight = false;
  var paused = false;
  var failures = 0;
  var served = {}; // region id -> the HTML the server last sent for it

  function interval() {
    var ms = parseInt(body.getAttribute("data-live-ms") || "0", 10);
    return isNaN(ms) ? 0 : ms;
  }

  function show(text, state) {
    if (!statusEl || !toggle) { return; }
    var live = interval() > 0;
    statusEl.hidden = !live && state !== "offline" && state !== "problem";
    toggle.hidden = !live;
    statusEl.textContent = text;
    statusEl.setAttribute("data-state", state);
    toggle.textContent = paused ? "Resume" : "Pause";
  }

  function schedule() {
    clearTimeout(timer);
    timer = null;
    var ms = interval();
    if (paused || ms <= 0 || document.hidden) { return; }
    if (failures) { ms = Math.min(ms * Math.pow(2, failures), 30000); }
    timer = setTimeout(refresh, ms);
  }

  /* Reopen <details> the reader had opened, and re-enable copy buttons, in fresh HTML. */
  function enhance(root, openIds) {
    root.querySelectorAll("button[data-copy]").forEach(function (button) {
      button.hidden = !(navigator.clipboard && window.isSecureContext);
    });
    (openIds || []).forEach(function (id) {
      var details = document.getElementById(id);
      if (details && details.tagName === "DETAILS" && root.contains(details)) { details.open = true; }
    });
  }

  function swap(fresh) {
    document.querySelectorAll("[data-live][id]").forEach(function (region) {
      var next = fresh.getElementById(region.id);
      if (!next || served[region.id] === next.innerHTML) { return; }
      var openIds = [];
      region.querySelectorAll("details[open][id]").forEach(function (d) { openIds.push(d.id); });
      served[region.id] = next.innerHTML;
      region.innerHTML = next.innerHTML;
      enhance(region, openIds);
    });
    body.setAttribute("data-live-ms", fresh.body.getAttribute("data-live-ms") || "0");
    body.setAttribute("data-problems", fresh.body.getAttribute("data-problems") || "0");
  }

  /* "Live" is green only while nothing is wrong: a banner (a failed reload or sync, a
   * database problem) turns it into a warning. */
  function showLive() {
    var problems = parseInt(body.getAttribute("data-problems") || "0", 10);
    if (problems > 0) { show("Live, see the warning above", "problem"); }
    else { show("Live", "live"); }
  }

  function refresh() {
    timer = null;
    if (inFlight || paused) { return; }
    inFlight = true;
    fetch(window.location.href, {
      headers: { "Accept": "text/html" }, cache: "no-store", credentials: "same-origin"
    }).then(function (response) {
      if (response.status >= 500) { throw { serverError: response.status }; }
      return response.text().then(function (html) {
        if (String(response.status) !== body.getAttribute("data-status")) {
          window.location.reload();
          return;
        }
        swap(new DOMParser().parseFromString(html, "text/html"));
        failures = 0;
        showLive();
      });
    }).catch(function (problem) {
      failures += 1;  // keep showing the last good page, and look again a little later
      show(problem && problem.serverError ? "Server error, retrying" : "Offline, retrying",
           "offline");
    }).then(function () {
      inFlight = false;
      schedule();
    });
  }

  document.querySelectorAll("[data-live][id]").forEach(function (region) {
    served[region.id] = region.innerHTML;
  });
  enhance(document);

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-copy]") : null;
    if (!button) { return; }
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source) { return; }
    navigator.clipboard.writeText(source.textContent).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  });

  if (toggle) {
    toggle.addEventListener("click", function () {
      paused = !paused;
      if (paused) { show("Paused", "paused"); } else { showLive(); }
      if (paused) { schedule(); } else { refresh(); }
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && !timer && !inFlight && !paused && interval() > 0) { refresh(); }
  });

  showLive();
  schedule();
})();
