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
  // Once an action's form is sent, this page is on its way out: no more polls, and no
  // reload that could overtake the action's own redirect (and its message).
  var leaving = false;
  document.addEventListener("submit", function () { leaving = true; }, true);
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
    data.by_queue = by(data.queues, "name");
    data.by_worker = by(data.workers, "queue");
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

  // A bar's segments, as templating.py's segments(): failures always show (MIN_FAILED wide
  // at least, taken from the widest other segment), so a group with failures never looks all green.
  var MIN_FAILED = 20;

  function segments(progress) {
    var total = progress.total || 0;
    var out = [];
    if (!total) return out;
    var x = 0, done = 0;
    ORDER.forEach(function (name) {
      var count = progress[name] || 0;
      if (!count) return;
      done += count;
      var end = Math.round(1000 * done / total);
      out.push([name, end - x]);
      x = end;
    });
    var failed = out.filter(function (s) { return s[0] === "failed"; })[0];
    if (failed && failed[1] < MIN_FAILED) {
      var widest = null;
      out.forEach(function (s) { if (s !== failed && (!widest || s[1] > widest[1])) widest = s; });
      var give = widest ? Math.min(MIN_FAILED - failed[1], Math.max(0, widest[1] - 1)) : 0;
      failed[1] += give;
      if (widest) widest[1] -= give;
    }
    return out;
  }

  function bar(svg, progress) {
    svg.querySelectorAll("rect.seg").forEach(function (rect) { rect.remove(); });
    var x = 0;
    segments(progress).forEach(function (seg) {
      var rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      rect.setAttribute("class", "seg seg-" + seg[0]);
      rect.setAttribute("data-seg", seg[0]);
      rect.setAttribute("x", String(x));
      rect.setAttribute("y", "0");
      rect.setAttribute("width", String(seg[1]));
      rect.setAttribute("height", "12");
      svg.appendChild(rect);
      x += seg[1];
    });
  }

  function apply(data) {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      var value = lookup(data, el.getAttribute("data-live"));
      if (value === undefined || value === null) return;
      var text = el.getAttribute("data-format") === "number" ? Number(value).toLocaleString("en-US") : String(value);
      if (el.textContent !== text) el.textContent = text;
      if (el.hasAttribute("data-badge")) el.className = "badge st-" + text;
      if (el.hasAttribute("data-live-some")) el.classList.toggle("some", Number(value) > 0);
    });
    document.querySelectorAll("[data-live-shown]").forEach(function (el) {
      el.hidden = !(Number(lookup(data, el.getAttribute("data-live-shown"))) > 0);
    });
    document.querySelectorAll("[data-live-points]").forEach(function (line) {
      var points = lookup(data, line.getAttribute("data-live-points"));
      if (typeof points === "string" && line.getAttribute("points") !== points) line.setAttribute("points", points);
    });
    document.querySelectorAll("[data-live-plural]").forEach(function (el) {
      var count = lookup(data, el.getAttribute("data-live-plural"));
      if (count === undefined || count === null) return;
      var word = Number(count) === 1 ? el.getAttribute("data-one") : el.getAttribute("data-many");
      if (el.textContent !== word) el.textContent = word;
    });
    document.querySelectorAll("[data-live-bar]").forEach(function (svg) {
      var progress = lookup(data, svg.getAttribute("data-live-bar"));
      if (progress) bar(svg, progress);
    });
    document.querySelectorAll("[data-live-row]").forEach(function (row) {
      row.classList.toggle("gone", lookup(data, row.getAttribute("data-live-row")) === undefined);
    });
  }

  // The group page's timeline: new events are appended while its page has room; then
  // a "Newer" link leads on (the timeline pages forward by stream id, oldest first).
  var timeline = document.querySelector("[data-events-url]");

  function badge(status) {
    var span = document.createElement("span");
    span.className = "badge st-" + status;
    span.textContent = status;
    return span;
  }

  function eventRow(event) {
    var row = document.createElement("tr");
    row.setAttribute("data-event", event.id);
    var when = document.createElement("td");
    when.className = "small";
    var time = document.createElement("time");
    time.setAttribute("datetime", event.at);
    time.title = event.at.slice(0, 10) + " " + event.at.slice(11, 19) + " UTC";
    time.textContent = event.at.slice(11, 19);
    when.appendChild(time);
    var what = document.createElement("td");
    if (event.url) {
      var link = document.createElement("a");
      link.href = event.url;
      link.textContent = event.label;
      what.appendChild(link);
    } else {
      what.textContent = event.label;
    }
    var change = document.createElement("td");
    if (event.from) {
      change.appendChild(badge(event.from));
      var arrow = document.createElement("span");
      arrow.className = "muted";
      arrow.textContent = " → ";
      change.appendChild(arrow);
    }
    change.appendChild(badge(event.to));
    var details = document.createElement("td");
    details.className = "message";
    details.textContent = event.note;
    if (event.error) {
      var error = document.createElement("code");
      error.className = "error";
      error.textContent = event.error;
      error.title = event.details.error || "";
      details.appendChild(document.createTextNode(" "));
      details.appendChild(error);
    }
    [when, what, change, details].forEach(function (cell) { row.appendChild(cell); });
    return row;
  }

  function events() {
    if (!timeline) return Promise.resolve();
    var room = parseInt(timeline.getAttribute("data-room"), 10) || 0;
    var after = timeline.getAttribute("data-after");
    var query = "?count=" + Math.max(room, 1) + (after ? "&after=" + encodeURIComponent(after) : "");
    return fetch(timeline.getAttribute("data-events-url") + query, {
      headers: { accept: "application/json" }, credentials: "same-origin"
    })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (!data) return;
        var shown = room > 0 ? data.events : [];
        var body = timeline.querySelector("tbody");
        shown.forEach(function (event) { body.appendChild(eventRow(event)); });
        if (shown.length) {
          timeline.querySelector("table").hidden = false;
          timeline.querySelector(".events-empty").hidden = true;
          after = shown[shown.length - 1].id;
          timeline.setAttribute("data-after", after);
          timeline.setAttribute("data-room", String(room - shown.length));
        }
        var newer = timeline.querySelector("a.newer");
        if (newer && (data.more || (room <= 0 && data.count > 0))) {
          newer.href = timeline.getAttribute("data-page") + "?after=" + encodeURIComponent(after) + "#timeline";
          newer.hidden = false;
        }
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
    if (leaving) return;
    if (document.hidden) { window.setTimeout(poll, every); return; }
    fetch(url, { headers: { accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 404) { gone(); return null; }
        if (!response.ok) throw new Error(String(response.status));
        return response.json();
      })
      .then(function (data) {
        if (data === null || leaving) return;
        apply(index(data));
        if (data.live) {
          return events().then(function () { window.setTimeout(poll, every); });
        } else {
          // The work is over: load the final page once (results, buttons).
          window.location.reload();
        }
      })
      .catch(function () { window.setTimeout(poll, every * 2); });
  }

  window.setTimeout(poll, every);
})();
