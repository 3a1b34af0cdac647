// The console's own script: the live view's stream, and two small helpers for forms.
// Loaded by every page; each part starts only where its elements are.
"use strict";

(function () {
  const MAX_SHOWN = 500;     // events kept on the page, the oldest removed first
  const MAX_HELD = 1000;     // events held while paused

  function text(tag, value, className) {
    const node = document.createElement(tag);
    node.textContent = value;
    if (className) node.className = className;
    return node;
  }

  function pretty(value) {
    return JSON.stringify(value, null, 2);
  }

  function eventNode(live, event) {
    const item = document.createElement("details");
    item.className = "live-event";
    item.dataset.topic = event.topic;
    const summary = document.createElement("summary");
    summary.append(
      text("time", event.time.replace("T", " ").slice(0, 19)),
      text("code", event.topic, "topic"),
      text("span", event.id, "id")
    );
    item.append(summary);
    const facts = document.createElement("dl");
    facts.className = "facts";
    const link = document.createElement("a");
    link.href = live.dataset.events + encodeURIComponent(event.id);
    link.textContent = event.id;
    facts.append(text("dt", "Event id"), document.createElement("dd"));
    facts.lastChild.append(link);
    facts.append(text("dt", "Delivery id"), text("dd", event.deliveryId || "-"));
    facts.append(text("dt", "Time"), text("dd", event.time));
    item.append(facts, text("h3", "Payload"), text("pre", pretty(event.payload), "json"),
      text("h3", "Metadata"), text("pre", pretty(event.metadata), "json"));
    return item;
  }

  function startLive(live) {
    const form = document.getElementById("live-filter");
    const status = document.getElementById("live-status");
    const pause = document.getElementById("live-pause");
    const empty = document.getElementById("live-empty");
    let source = null;
    let paused = false;
    let held = [];
    let heldLost = 0;

    function show(node) {
      if (empty) empty.remove();
      live.prepend(node);
      while (live.children.length > MAX_SHOWN) live.lastChild.remove();
    }

    function marker(count) {
      return text("p", count + " events were not shown: this browser did not keep up", "dropped");
    }

    function connect() {
      if (source) source.close();
      const topic = form.elements.topic.value.trim();
      const url = live.dataset.stream + (topic ? "?topic=" + encodeURIComponent(topic) : "");
      source = new EventSource(url);
      status.textContent = "connecting…";
      source.onopen = function () {
        status.textContent = topic ? "watching " + topic : "watching every topic";
        live.dataset.state = "watching";
      };
      source.onerror = function () {
        status.textContent = "disconnected; trying again…";
        live.dataset.state = "disconnected";
      };
      source.addEventListener("event", function (message) {
        const node = eventNode(live, JSON.parse(message.data));
        if (paused) {
          if (held.length < MAX_HELD) held.push(node); else heldLost += 1;
          status.textContent = "paused: " + (held.length + heldLost) + " events waiting";
        } else {
          show(node);
        }
      });
      source.addEventListener("dropped", function (message) {
        const count = JSON.parse(message.data).count;
        if (paused) heldLost += count; else show(marker(count));
      });
    }

    form.addEventListener("submit", function (submitted) {
      submitted.preventDefault();
      const url = new URL(window.location.href);
      url.searchParams.set("topic", form.elements.topic.value.trim());
      window.history.replaceState(null, "", url);
      connect();
    });
    pause.addEventListener("click", function () {
      paused = !paused;
      pause.textContent = paused ? "Resume" : "Pause";
      pause.setAttribute("aria-pressed", String(paused));
      if (!paused) {
        if (heldLost) show(marker(heldLost));
        held.forEach(show);
        held = [];
        heldLost = 0;
        status.textContent = "watching";
      } else {
        status.textContent = "paused";
      }
    });
    connect();
  }

  function startForms() {
    const all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll('#redrive input[name="id"]').forEach(function (box) {
          box.checked = all.checked;
        });
      });
    }
    document.querySelectorAll("button[data-confirm]").forEach(function (button) {
      button.addEventListener("click", function (clicked) {
        if (!window.confirm(button.dataset.confirm)) clicked.preventDefault();
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const live = document.getElementById("live");
    if (live) startLive(live);
    startForms();
  });
})();
