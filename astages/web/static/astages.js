/* astages dashboard: confirmations and live figures. Plain JavaScript, no build step. */
(function () {
  "use strict";

  // A destructive button asks first; the server asks again when this script did not run.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (!question) return;
    if (window.confirm(question)) {
      form.elements.namedItem("confirmed").value = "1";
    } else {
      event.preventDefault();
    }
  });

  var body = document.body;
  var url = body.getAttribute("data-live-url");
  if (!url) return;
  var every = parseInt(body.getAttribute("data-poll-ms"), 10) || 2000;
  var flag = document.querySelector(".live-flag");
  if (flag) flag.hidden = false;
  var ORDER = ["successful", "failed", "cancelled", "running", "pending_re_run", "queued", "pending"];

  function index(data) {
    var by = function (list, key) {
      var out = {};
      (list || []).forEach(function (item) { out[String(item[key])] = item; });
      return out;
    };
    data.by_id = by(data.groups, "id");
    data.by_number = by(data.stages, "number");
    data.by_seq = by(data.jobs, "seq");
    return data;
  }

  function lookup(data, path) {
    var parts = path.split(".");
    var value = data;
    for (var i = 0; i < parts.length; i++) {
      if (value === null || value === undefined) return undefined;
      value = value[parts[i]];
    }
    return value;
  }

  function bar(svg, progress) {
    var total = progress.total || 0;
    svg.querySelectorAll("rect.seg").forEach(function (rect) { rect.remove(); });
    if (!total) return;
    var x = 0, done = 0;
    ORDER.forEach(function (name) {
      var count = progress[name] || 0;
      if (!count) return;
      done += count;
      var end = Math.round(1000 * done / total);
      var rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      rect.setAttribute("class", "seg seg-" + name);
      rect.setAttribute("x", String(x));
      rect.setAttribute("y", "0");
      rect.setAttribute("width", String(end - x));
      rect.setAttribute("height", "12");
      svg.appendChild(rect);
      x = end;
    });
  }

  function apply(data) {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var value = lookup(data, el.getAttribute("data-live"));
      if (value === undefined || value === null) return;
      var text = el.getAttribute("data-format") === "number" ? Number(value).toLocaleString("en-US") : String(value);
      if (el.textContent !== text) el.textContent = text;
      if (el.hasAttribute("data-badge")) el.className = "badge st-" + text;
    });
    document.querySelectorAll("[data-live-bar]").forEach(function (svg) {
      var progress = lookup(data, svg.getAttribute("data-live-bar"));
      if (progress) bar(svg, progress);
    });
    document.querySelectorAll("[data-live-row]").forEach(function (row) {
      row.classList.toggle("gone", lookup(data, row.getAttribute("data-live-row")) === undefined);
    });
  }

  function gone() {
    var notice = document.querySelector(".gone-notice");
    if (notice) {
      notice.textContent = "This finished or was deleted; its figures stay as they were last seen.";
      notice.hidden = false;
    }
    if (flag) flag.hidden = true;
  }

  function poll() {
    if (document.hidden) { window.setTimeout(poll, every); return; }
    fetch(url, { headers: { accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 404) { gone(); return null; }
        if (!response.ok) throw new Error(String(response.status));
        return response.json();
      })
      .then(function (data) {
        if (data === null) return;
        apply(index(data));
        if (data.live) {
          window.setTimeout(poll, every);
        } else {
          // The work is over: load the final page once (results, buttons).
          window.location.reload();
        }
      })
      .catch(function () { window.setTimeout(poll, every * 2); });
  }

  window.setTimeout(poll, every);
})();
