/* devserver dashboard: the buttons. Hand-written; no build step, no CDN.
 *
 * Every button is a JSON endpoint first (rerun, cancel, send, invoke, trigger, sync); a page
 * shows it as a <form class="action" action=URL data-method=... data-go=...>, and this script
 * sends the form's JSON (its <textarea name="body">, if any) to that URL from this page, so the
 * request is same-origin. On success it goes where `data-go` says: "run" (the run the answer
 * names), "event" (the event sent), or "reload"; on failure it shows the server's error.
 */
(function () {
  "use strict";

  function envQuery() {
    var env = new URLSearchParams(window.location.search).get("env");
    return env ? "?env=" + encodeURIComponent(env) : "";
  }

  function target(go, answer) {
    if (go === "run") {
      var run = answer.run ? answer.run.run_id : (answer.run_ids || [])[0];
      return run ? "/runs/" + encodeURIComponent(run) + envQuery() : null;
    }
    if (go === "event") {
      var ev = (answer.ids || [])[0] || answer.event_id;
      return ev ? "/events/" + encodeURIComponent(ev) + envQuery() : null;
    }
    return null;
  }

  function say(form, text, bad) {
    var out = form.querySelector(".action-result");
    if (!out) { return; }
    out.textContent = text;
    out.classList.toggle("bad", !!bad);
  }

  /* A link to `#send-event` (edit and resend) opens the editor. */
  function openEditor() {
    var editor = window.location.hash === "#send-event" && document.getElementById("send-event");
    if (editor) { editor.open = true; editor.scrollIntoView(); }
  }
  window.addEventListener("hashchange", openEditor);
  openEditor();

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList || !form.classList.contains("action")) { return; }
    event.preventDefault();
    var field = form.querySelector("textarea[name=body]");
    var text = field ? field.value : "";
    if (field) {
      try { JSON.parse(text); } catch (problem) {
        say(form, "Not valid JSON: " + problem.message, true);
        return;
      }
    }
    var button = form.querySelector("button[type=submit]");
    if (button) { button.disabled = true; }
    say(form, "Working…", false);
    fetch(form.getAttribute("action"), {
      method: form.getAttribute("data-method") || "POST",
      headers: { "Content-Type": "application/json", "Accept": "application/json" },
      body: text, credentials: "same-origin", cache: "no-store"
    }).then(function (response) {
      return response.json().then(function (answer) {
        if (!response.ok) { throw new Error(answer.error || ("HTTP " + response.status)); }
        var go = form.getAttribute("data-go") || "reload";
        var next = target(go, answer);
        if (next) { window.location.assign(next); return; }
        if (go === "reload") { window.location.reload(); return; }
        say(form, form.getAttribute("data-done") || "Done", false);
      });
    }).catch(function (problem) {
      say(form, String(problem && problem.message ? problem.message : problem), true);
    }).then(function () {
      if (button) { button.disabled = false; }
    });
  });
})();
