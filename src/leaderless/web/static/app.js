// The leaderless dashboard: plain JS, no build step. One server-sent event stream
// (/api/dashboard/stream, at most one snapshot a second) feeds the members table, the ring,
// the alerts and this node's charts; keyspaces are fetched every 10 s.
"use strict";

(function () {
  const POINTS_MAX = 300;
  const KEYSPACES_EVERY_MS = 10000;
  const STATE_COLOURS = {alive: "#2f9e44", suspect: "#f08c00", dead: "#e03131", left: "#868e96"};
  const PALETTE = ["#1c7ed6", "#7048e8", "#0ca678", "#f76707", "#d6336c", "#1098ad",
                   "#5c940d", "#ae3ec9", "#e67700", "#495057"];

  // Exposed for operators' consoles and for the browser test.
  const dashboard = window.dashboard = {
    charts: {}, series: {}, events: 0, last: null, ring: null, node: null,
    states: {},  // every state shown for each member, in order: {name: ["alive", ...]}
    points(name) {
      const chart = dashboard.charts[name];
      return chart ? chart.getOption().series[0].data.length : 0;
    },
  };

  const $ = (id) => document.getElementById(id);
  const text = (value) => (value === null || value === undefined ? "" : String(value));

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function bytes(value) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = Math.abs(value), i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (value < 0 ? "-" : "") + v.toFixed(v < 10 && i > 0 ? 1 : 0) + " " + units[i];
  }
  const pct = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(0) + " %");
  const num = (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  // -- charts of this node ---------------------------------------------------------------
  const CHARTS = [
    {id: "cpu", title: "CPU", unit: "%", max: 100, series: [["busy", (s) => s.system && s.system.cpu_pct]]},
    {id: "memory", title: "Memory used", unit: "%", max: 100, series: [["used", (s) => s.system && s.system.mem_pct]]},
    {id: "disk", title: "Disk used (data dir)", unit: "%", max: 100, series: [["used", (s) => s.system && s.system.disk_pct]]},
    {id: "network", title: "Network traffic", unit: "B/s", bytes: true, series: [
      ["in", (s) => s.system && s.system.net_in_bps], ["out", (s) => s.system && s.system.net_out_bps]]},
    {id: "load", title: "Load average", unit: "", series: [
      ["1 min", (s) => s.system && s.system.load_1m], ["5 min", (s) => s.system && s.system.load_5m]]},
    {id: "diskio", title: "Disk I/O", unit: "B/s", bytes: true, series: [
      ["read", (s) => s.system && s.system.disk_read_bps], ["write", (s) => s.system && s.system.disk_write_bps]]},
    {id: "p99", title: "Response time p99", unit: "ms", series: [["p99", (s) => s.requests && s.requests.p99_ms]]},
    {id: "rate", title: "Request rate", unit: "ops/s", series: [["ops/s", (s) => s.requests && s.requests.ops_per_s]]},
  ];

  function axisLabel(spec) {
    return (v) => (spec.bytes ? bytes(v) + "/s" : v + (spec.unit && spec.unit !== "%" ? "" : spec.unit));
  }

  function makeChart(spec) {
    const chart = echarts.init($("chart-" + spec.id));
    dashboard.series[spec.id] = spec.series.map(() => []);
    chart.setOption({
      animation: false,
      title: {text: spec.title + (spec.unit && !spec.bytes ? " (" + spec.unit + ")" : ""),
              textStyle: {fontSize: 13, fontWeight: 600}, left: 0},
      tooltip: {trigger: "axis", valueFormatter: (v) => (spec.bytes ? bytes(v) + "/s" : num(v, 2) + " " + spec.unit)},
      legend: spec.series.length > 1 ? {right: 0, top: 0} : undefined,
      grid: {left: 64, right: 12, top: 34, bottom: 26},
      xAxis: {type: "time", splitLine: {show: false}},
      yAxis: {type: "value", min: 0, max: spec.max, axisLabel: {formatter: axisLabel(spec)}},
      series: spec.series.map(([name], i) => ({
        name, type: "line", showSymbol: false, data: [], color: PALETTE[i],
        areaStyle: spec.series.length === 1 ? {opacity: 0.15} : undefined,
      })),
    });
    dashboard.charts[spec.id] = chart;
  }

  function appendPoints(snapshot) {
    const t = Math.round(snapshot.time * 1000);
    for (const spec of CHARTS) {
      const data = dashboard.series[spec.id];
      spec.series.forEach(([, get], i) => {
        const value = get(snapshot);
        if (value === null || value === undefined) return;
        data[i].push([t, value]);
        if (data[i].length > POINTS_MAX) data[i].splice(0, data[i].length - POINTS_MAX);
      });
      dashboard.charts[spec.id].setOption({series: data.map((d) => ({data: d}))});
    }
  }

  // -- ring -------------------------------------------------------------------------------
  function makeRing() {
    dashboard.ring = echarts.init($("ring"));
    dashboard.ring.setOption({
      animation: false,
      tooltip: {trigger: "item", formatter: (p) => `${p.name}: ${p.value.toFixed(1)} % of the ring (${p.data.state})`},
      series: [{
        type: "pie", radius: ["45%", "72%"], avoidLabelOverlap: true,
        label: {formatter: (p) => `${p.name}\n${p.value.toFixed(1)} %`},
        itemStyle: {borderColor: "#fff", borderWidth: 2},
        data: [],
      }],
    });
  }

  function updateRing(members) {
    const data = members.filter((m) => m.ownership > 0 || m.state === "alive").map((m, i) => ({
      name: m.name, value: 100 * m.ownership, state: m.state,
      itemStyle: {color: m.state === "alive" ? PALETTE[i % PALETTE.length] : STATE_COLOURS[m.state] || "#adb5bd",
                  opacity: m.state === "alive" ? 1 : 0.6},
    }));
    dashboard.ring.setOption({series: [{data}]});
  }

  // -- members ---------------------------------------------------------------------------
  function updateMembers(snapshot) {
    const tbody = $("members").querySelector("tbody");
    const rows = snapshot.members.map((m) => {
      const load = m.load || {};
      const cells = [
        // Each member serves its own dashboard (its charts) on its HTTP port.
        el("td", {class: "name"}, [m.http && m.name !== snapshot.node
          ? el("a", {href: "http://" + m.http + "/", title: "this member's dashboard", text: m.name})
          : el("span", {text: m.name})]),
        el("td", {class: "state state-" + m.state, text: m.state}),
        el("td", {class: "zone", text: m.zone || "–"}),
        el("td", {class: "address muted", text: m.address}),
        el("td", {class: "num ownership", text: (100 * m.ownership).toFixed(1) + " %"}),
        el("td", {class: "num cpu", text: pct(load.cpu_pct)}),
        el("td", {class: "num mem", text: pct(load.mem_pct)}),
        el("td", {class: "num disk", text: pct(load.disk_pct)}),
        el("td", {class: "num ops", text: num(load.ops_per_s, 0)}),
        el("td", {class: "num p99", text: load.p99_ms === undefined ? "–" : num(load.p99_ms, 2) + " ms"}),
      ];
      return el("tr", {"data-member": m.name, "data-state": m.state,
                       class: m.name === snapshot.node ? "self" : ""}, cells);
    });
    tbody.replaceChildren(...rows);
    for (const m of snapshot.members) {
      const seen = dashboard.states[m.name] || (dashboard.states[m.name] = []);
      if (seen[seen.length - 1] !== m.state) seen.push(m.state);
    }
    const counts = {};
    for (const m of snapshot.members) counts[m.state] = (counts[m.state] || 0) + 1;
    $("member-summary").textContent = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(", ");
  }

  // -- alerts ----------------------------------------------------------------------------
  function updateAlerts(alerts) {
    const list = $("alerts");
    if (alerts === null || alerts === undefined) {
      list.replaceChildren(el("li", {class: "muted", text: "this node evaluates no alert rules"}));
      $("alert-count").textContent = "";
      return;
    }
    // Rules give {name, severity, state (firing|pending|resolved), message, ...}; any
    // other shape is shown as it comes.
    const firing = alerts.filter((a) => !a || typeof a !== "object" || !a.state || a.state === "firing");
    $("alert-count").textContent = firing.length ? `${firing.length} firing` : "";
    if (!alerts.length) {
      list.replaceChildren(el("li", {class: "muted", text: "no alerts firing"}));
      return;
    }
    list.replaceChildren(...alerts.map((a) => {
      if (typeof a !== "object" || a === null) return el("li", {text: text(a)});
      const severity = text(a.severity || a.level || "");
      const state = text(a.state || "firing");
      const name = text(a.name || a.rule || a.alert || "");
      const message = text(a.message || a.summary || a.description || "");
      const body = [name, message].filter(Boolean).join(": ") || JSON.stringify(a);
      return el("li", {class: "alert alert-" + state, "data-alert": name, "data-state": state}, [
        el("span", {class: "severity severity-" + severity.toLowerCase(), text: severity}),
        el("span", {class: "alert-state", text: state}),
        el("span", {text: body}),
      ]);
    }));
  }

  // -- keyspaces (plain HTTP, every 10 s) ------------------------------------------------
  async function refreshKeyspaces() {
    const tbody = $("keyspaces").querySelector("tbody");
    try {
      const response = await fetch("/v1/keyspaces", {cache: "no-store"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const body = await response.json();
      const rows = body.keyspaces.map((k) => el("tr", {"data-keyspace": k.name}, [
        el("td", {text: k.name}), el("td", {text: k.mode}),
        el("td", {class: "num", text: text(k.replication)}),
        el("td", {text: k.read_consistency}), el("td", {text: k.write_consistency}),
      ]));
      tbody.replaceChildren(...(rows.length ? rows
        : [el("tr", {}, [el("td", {colspan: "5", class: "muted", text: "no keyspaces yet"})])]));
    } catch (err) {
      tbody.replaceChildren(el("tr", {}, [el("td", {colspan: "5", class: "muted",
                                                    text: "could not load keyspaces: " + err.message})]));
    }
  }

  // -- the stream ------------------------------------------------------------------------
  function setConnection(state, label) {
    const badge = $("connection");
    badge.className = "connection " + state;
    badge.textContent = label;
  }

  function onSnapshot(event) {
    const snapshot = JSON.parse(event.data);
    dashboard.last = snapshot;
    dashboard.events += 1;
    if (dashboard.node !== snapshot.node) {
      dashboard.node = snapshot.node;
      $("node-name").textContent = snapshot.node;
      for (const span of document.querySelectorAll(".node-name-copy")) span.textContent = snapshot.node;
      document.title = "leaderless · " + snapshot.node;
    }
    setConnection("live", "live");
    $("updated").textContent = "updated " + new Date(snapshot.time * 1000).toLocaleTimeString();
    updateMembers(snapshot);
    updateRing(snapshot.members);
    updateAlerts(snapshot.alerts);
    appendPoints(snapshot);
  }

  function connect() {
    const source = new EventSource("/api/dashboard/stream");
    source.addEventListener("snapshot", onSnapshot);
    source.onopen = () => setConnection("live", "live");
    // EventSource reconnects by itself (the server asks for 2 s); a 503 (too many
    // dashboards open on this node) closes it for good, so retry later ourselves.
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        setConnection("lost", "disconnected: retrying in 5 s");
        setTimeout(connect, 5000);
      } else {
        setConnection("lost", "connection lost: reconnecting…");
      }
    };
    dashboard.source = source;
  }

  CHARTS.forEach(makeChart);
  makeRing();
  window.addEventListener("resize", () => {
    for (const chart of Object.values(dashboard.charts)) chart.resize();
    dashboard.ring.resize();
  });
  refreshKeyspaces();
  setInterval(refreshKeyspaces, KEYSPACES_EVERY_MS);
  connect();
})();
