// fedfhe-dashboard's page: renders each view the /events stream sends (see coordinator/dashboard.py).
//
// Two rules hold everywhere below:
// - Strings reach the DOM only as text (textContent, text nodes, attribute values): decline reasons and
//   worker names come from hospitals, so nothing here ever parses them as HTML.
// - Every field may be missing (an older coordinator or dashboard): each read goes through num/str/arr/obj.
"use strict";

(function () {
  // ---- defensive readers -------------------------------------------------------------------------
  const num = (x) => (typeof x === "number" && Number.isFinite(x) ? x : null);
  const str = (x) => (typeof x === "string" ? x : x === null || x === undefined ? "" : String(x));
  const arr = (x) => (Array.isArray(x) ? x : []);
  const obj = (x) => (x !== null && typeof x === "object" && !Array.isArray(x) ? x : {});

  // ---- formatting ---------------------------------------------------------------------------------
  const fixed = (x, digits) => (num(x) === null ? "–" : x.toFixed(digits));
  function bytes(x) {
    if (num(x) === null) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let v = x;
    let i = 0;
    while (v >= 1000 && i < units.length - 1) {
      v /= 1000;
      i += 1;
    }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
  }
  function ago(ms) {
    if (num(ms) === null) return "";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 2 ? "just now" : s < 120 ? s + " s ago" : Math.round(s / 60) + " min ago";
  }
  const clock = (ms) => (num(ms) === null ? "" : new Date(ms).toLocaleTimeString());

  // ---- DOM building: text only --------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    const p = obj(props);
    if (p.cls) for (const c of arr(p.cls)) node.classList.add(c);
    if (p.data) for (const [k, v] of Object.entries(p.data)) node.dataset[k] = str(v);
    if (p.title) node.title = str(p.title);
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(str(child)));
    }
    return node;
  }
  const $ = (id) => document.getElementById(id);
  function setText(id, text) {
    const node = $(id);
    if (node) node.textContent = str(text);
  }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // Class names come from this list, never from the data (classList.add throws on a space, and a
  // hospital should not choose our styling).
  const STATES = new Set(["open", "unmasking", "aggregated", "failed", "evicted"]);
  const stateBadge = (state) =>
    el("span", { cls: ["badge", STATES.has(state) ? "state-" + state : "state-other"] }, state || "unknown");
  const yesNo = (flag, yes, no, bad) =>
    el("span", { cls: [flag ? "yes" : bad ? "bad" : "no"] }, flag ? yes : no);

  // ---- charts (the page works without them if the vendored file failed to load) ---------------------
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f"];
  const charts = {};
  function chart(id, yTitle) {
    if (charts[id] !== undefined) return charts[id];
    const canvas = $(id);
    if (typeof Chart === "undefined" || !canvas) {
      charts[id] = null;
      if (canvas) canvas.replaceWith(el("p", { cls: ["muted"] }, "charts unavailable"));
      return null;
    }
    charts[id] = new Chart(canvas, {
      type: "line",
      data: { datasets: [] },
      options: {
        animation: false,
        maintainAspectRatio: false,
        parsing: false,
        scales: {
          x: { type: "linear", min: 0, ticks: { stepSize: 1, precision: 0 }, title: { display: true, text: "round" } },
          y: { title: { display: true, text: yTitle } },
        },
        plugins: { legend: { position: "bottom" } },
      },
    });
    return charts[id];
  }
  function plot(id, yTitle, datasets) {
    const c = chart(id, yTitle);
    if (!c) return;
    c.data.datasets = datasets;
    c.update("none");
  }
  const points = (pairs) => pairs.filter(([, y]) => num(y) !== null).map(([x, y]) => ({ x, y }));

  function renderCharts(status) {
    const rounds = arr(status.rounds).map(obj);
    plot("loss-chart", "loss", [
      {
        label: "held-out loss (global adapter)",
        data: points([[0, status.baseline_eval_loss], ...rounds.map((r) => [num(r.round), r.eval_loss])]),
        borderColor: PALETTE[0], backgroundColor: PALETTE[0],
      },
      {
        label: "train loss (mean of participants)",
        data: points(rounds.map((r) => [num(r.round), r.train_loss])),
        borderColor: PALETTE[1], backgroundColor: PALETTE[1],
      },
    ]);
    const workers = arr(status.workers).map(obj);
    const lastRound = Math.max(1, ...rounds.map((r) => num(r.round) || 0));
    const spent = workers.map((w, i) => {
      const name = str(w.worker_id);
      const series = rounds.map((r) => {
        const p = arr(r.participants).map(obj).find((q) => q.worker_id === name);
        return [num(r.round), p && p.dp !== false ? p.epsilon : null];
      });
      const color = PALETTE[i % PALETTE.length];
      return { label: name, data: points(series), borderColor: color, backgroundColor: color };
    });
    const budgets = [...new Set(workers.map((w) => num(w.epsilon_budget)).filter((b) => b !== null))];
    const lines = budgets.map((b) => ({
      label: "budget ε=" + b, data: [{ x: 0, y: b }, { x: lastRound, y: b }],
      borderColor: "#6b7280", borderDash: [6, 4], pointRadius: 0,
    }));
    plot("epsilon-chart", "ε", [...spent, ...lines]);
  }

  // ---- sections -------------------------------------------------------------------------------------
  function renderCards(status, node) {
    const rounds = arr(status.rounds).map(obj);
    setText("current-round", num(status.current_round) === null ? "–" : "round " + status.current_round);
    const closed = rounds.filter((r) => r.state === "aggregated").length;
    setText("round-detail", [
      status.finished ? "federation finished" : "running",
      closed + " aggregated",
      num(status.min_workers) !== null ? "min " + status.min_workers + " updates" : "",
    ].filter(Boolean).join(" · "));

    const evals = rounds.filter((r) => num(r.eval_loss) !== null);
    const latest = evals.length ? evals[evals.length - 1] : null;
    setText("latest-eval", latest ? fixed(latest.eval_loss, 3) : "–");
    setText("baseline-eval", [
      latest ? "after round " + latest.round : "",
      "base model " + fixed(status.baseline_eval_loss, 3),
    ].filter(Boolean).join(" · "));

    const locked = $("buffers-locked");
    if (locked) locked.replaceChildren(yesNo(status.buffers_locked === true, "locked in RAM", "not locked", true));
    setText("buffers-detail", [
      bytes(num(status.buffer_bytes_total)) + " held",
      num(status.keep_rounds) !== null ? "last " + status.keep_rounds + " rounds kept" : "",
    ].filter(Boolean).join(" · "));

    const sa = status.secure_aggregation === null || status.secure_aggregation === undefined
      ? null : obj(status.secure_aggregation);
    const secagg = $("secagg-state");
    if (secagg) {
      secagg.replaceChildren(sa === null ? "unknown"
        : yesNo(sa.enabled === true, "on", "off (pads only)", true));
    }
    setText("secagg-detail", sa === null ? "not reported by this coordinator"
      : (num(sa.threshold) !== null ? "threshold t=" + sa.threshold : "threshold: majority of each mask set")
        + (str(sa.scheme) ? " · " + str(sa.scheme) : ""));

    const n = node === null || node === undefined ? null : obj(node);
    const nodeState = $("node-state");
    if (nodeState) {
      nodeState.replaceChildren(n === null ? "not watched"
        : el("span", { cls: [n.state === "SERVING" ? "yes" : n.state === "unknown" ? "no" : "bad"] },
          str(n.state) || "unknown"));
    }
    setText("node-detail", n === null ? "start the dashboard with --fhe HOST:PORT"
      : [str(n.address), str(n.detail)].filter(Boolean).join(" · "));
  }

  function epsilonCell(w) {
    if (w.dp === false) return el("td", { cls: ["epsilon"] }, el("span", { cls: ["bad"] }, "no DP"));
    const eps = num(w.epsilon);
    const budget = num(w.epsilon_budget);
    const text = el("span", { cls: ["epsilon-value"], data: { value: eps === null ? "" : eps } }, fixed(eps, 3));
    const cell = el("td", { cls: ["epsilon"] }, text, budget === null ? "" : " / " + fixed(budget, 2));
    const used = num(w.budget_used);
    if (used !== null) {
      const bar = el("div", { cls: ["fill", used > 0.9 ? "fill-high" : "fill-ok"] });
      bar.style.width = Math.min(100, Math.max(0, used * 100)).toFixed(1) + "%";
      cell.append(el("div", { cls: ["meter"], title: (used * 100).toFixed(1) + "% of the budget" }, bar));
    }
    return cell;
  }

  function renderHospitals(status) {
    const workers = arr(status.workers).map(obj);
    const tbody = document.querySelector("#hospitals tbody");
    fill(tbody, workers.map((w) => el("tr", { data: { worker: w.worker_id } },
      el("td", { cls: ["mono"] }, str(w.worker_id)),
      el("td", null, yesNo(w.connected === true, "yes", "no")),
      el("td", null, num(w.num_records) === null ? "–" : String(w.num_records)),
      epsilonCell(w),
      el("td", null, yesNo(w.dp !== false, "on", "OFF", true)),
      el("td", { cls: ["pii"] }, yesNo(w.pii_scrubbed === true, "yes", "no", true)),
      el("td", null, num(w.last_round) ? String(w.last_round) : "–"),
      el("td", { cls: ["declined"] }, str(w.declined)),
    )));
    $("hospitals-empty").hidden = workers.length > 0;
  }

  function maskCell(m) {
    if (m === null || m === undefined) return el("td", { cls: ["muted"] }, "pads only");
    const mr = obj(m);
    const list = (label, names) => (arr(names).length ? el("div", null, label + ": " + arr(names).map(str).join(", ")) : null);
    return el("td", { cls: ["mask"] },
      el("div", null, "phase " + (str(mr.phase) || "?") + (num(mr.threshold) ? ", t=" + mr.threshold : "")),
      list("members", mr.members), list("survivors", mr.survivors), list("dropped", mr.dropped),
      list("revealed by", mr.revealed_by));
  }

  function renderRounds(status) {
    const rounds = arr(status.rounds).map(obj).slice().reverse();  // newest first
    const tbody = document.querySelector("#rounds tbody");
    fill(tbody, rounds.map((r) => {
      const parts = arr(r.participants).map(obj);
      const eligible = arr(r.eligible);
      return el("tr", { data: { round: r.round } },
        el("td", null, str(r.round)),
        el("td", { cls: ["state"], title: str(r.reason) }, stateBadge(str(r.state)),
          r.reason ? el("div", { cls: ["muted", "reason"] }, str(r.reason)) : null),
        el("td", { cls: ["participants"] },
          ...parts.map((p) => el("div", { data: { worker: p.worker_id } },
            str(p.worker_id) + " (" + (num(p.num_samples) ?? "?") + " samples"
            + (p.dp === false ? ", no DP" : num(p.epsilon) !== null ? ", ε " + fixed(p.epsilon, 3) : "") + ")")),
          eligible.length ? el("div", { cls: ["muted"] }, parts.length + " of " + eligible.length + " eligible") : null),
        el("td", { cls: ["declines"] }, ...arr(r.declines).map(obj).map((d) =>
          el("div", { cls: ["decline"] }, el("span", { cls: ["mono"] }, str(d.worker_id)), ": " + str(d.reason)))),
        el("td", { cls: ["num"] }, fixed(r.seconds, 1)),
        el("td", { cls: ["num"] }, bytes(num(r.bytes_received))),
        el("td", { cls: ["num"] }, bytes(num(r.buffer_bytes))),
        el("td", { cls: ["num", "train-loss"] }, fixed(r.train_loss, 3)),
        el("td", { cls: ["num", "eval-loss"] }, fixed(r.eval_loss, 3)),
        maskCell(r.mask_recovery));
    }));
    $("rounds-empty").hidden = rounds.length > 0;
  }

  function renderEvents(events) {
    const list = $("events");
    fill(list, arr(events).map(obj).map((e) =>
      el("li", null, el("span", { cls: ["muted", "mono"] }, clock(e.at_unix_ms)), " " + str(e.text))));
  }

  // ---- connection state -----------------------------------------------------------------------------
  let streamDown = false;
  let lastView = null;

  function renderConnection(coord) {
    const badge = $("connection");
    const banner = $("banner");
    let text = "";
    if (streamDown) {
      badge.textContent = "disconnected, retrying";
      badge.className = "badge badge-bad";
      text = "The dashboard server is unreachable: disconnected, retrying…";
    } else if (coord.connected === true) {
      badge.textContent = "live";
      badge.className = "badge badge-ok";
    } else if (coord.error) {
      badge.textContent = "disconnected, retrying";
      badge.className = "badge badge-bad";
      const retry = num(coord.retry_seconds);
      text = "Coordinator " + str(coord.address) + " disconnected, retrying"
        + (retry !== null ? " in " + retry + " s" : "") + " — " + str(coord.error)
        + (lastView && lastView.status ? " (showing the last known state)" : "");
    } else {
      badge.textContent = "connecting…";
      badge.className = "badge badge-wait";
    }
    banner.textContent = text;
    banner.hidden = text === "";
    $("main").classList.toggle("stale", text !== "");
  }

  function render(view) {
    const v = obj(view);
    lastView = v;
    const coord = obj(v.coordinator);
    renderConnection(coord);
    setText("updated", v.updated_unix_ms ? "updated " + ago(v.updated_unix_ms) : "");
    const status = v.status === null || v.status === undefined ? null : obj(v.status);
    if (status !== null) {
      setText("federation-id", str(status.federation_id) || "?");
      document.title = "fedfhe · " + (str(status.federation_id) || "federation");
      renderCards(status, v.node);
      renderHospitals(status);
      renderRounds(status);
      renderCharts(status);
    } else {
      renderCards({}, v.node);
    }
    renderEvents(v.events);
  }

  // ---- the stream -----------------------------------------------------------------------------------
  const source = new EventSource("events");
  source.onmessage = (msg) => {
    let view;
    try {
      view = JSON.parse(msg.data);
    } catch (err) {
      console.warn("fedfhe: unreadable view", err);
      return;
    }
    streamDown = false;
    render(view);
  };
  source.onerror = () => {
    // EventSource reconnects by itself (the server asks for 1 s); say so meanwhile.
    streamDown = true;
    renderConnection(obj(lastView && lastView.coordinator));
  };
  source.onopen = () => {
    streamDown = false;
  };
  setInterval(() => {
    if (lastView) setText("updated", "updated " + ago(lastView.updated_unix_ms));
  }, 1000);

  // For tests and the console: render a view by hand.
  window.fedfheDashboard = { render };
})();
