// The leaderless dashboard: plain JS, no build step. One server-sent event stream
// (/api/dashboard/stream, at most one snapshot a second) feeds the members table, the ring,
// the alerts and this node's charts; keyspaces are fetched every 10 s, and the doctor's
// findings (GET /api/doctor, which asks every member) at most every 10 s.
//
// Auth: GET /v1/auth/whoami says whether the node requires a login ({"auth": false} when
// off; 401 when on and this browser has no valid session). The session is the HttpOnly
// cookie POST /v1/auth/login sets; this script never sees or stores the token.
"use strict";

(function () {
  const POINTS_MAX = 300;
  const KEYSPACES_EVERY_MS = 10000;
  const DOCTOR_EVERY_MS = 10000;  // each diagnosis asks every member for a report
  const TASKS_EVERY_MS = 5000;  // GET /api/tasks/stats asks every member's HTTP listener
  const RETRY_MS = 5000;  // after a refused stream or an unreachable node
  const STATE_COLOURS = {alive: "#2f9e44", suspect: "#f08c00", dead: "#e03131", left: "#868e96"};
  const PALETTE = ["#1c7ed6", "#7048e8", "#0ca678", "#f76707", "#d6336c", "#1098ad",
                   "#5c940d", "#ae3ec9", "#e67700", "#495057"];

  // Exposed for operators' consoles and for the browser test.
  const dashboard = window.dashboard = {
    charts: {}, series: {}, events: 0, last: null, ring: null, node: null, doctor: null,
    states: {},  // every state shown for each member, in order: {name: ["alive", ...]}
    auth: {enabled: null, user: null, roles: [], expires_at: null},  // null: not known yet
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
        // Each member serves its own dashboard (its charts) on its HTTP port, over TLS too
        // when this one is.
        el("td", {class: "name"}, [m.http && m.name !== snapshot.node
          ? el("a", {href: location.protocol + "//" + m.http + "/", title: "this member's dashboard", text: m.name})
          : el("span", {text: m.name})]),
        el("td", {class: "state state-" + m.state, text: m.state}),
        healthCell(m.health),
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

  // Each member's gossiped health: healthy, degraded, read-only or leaving, with its reason.
  function healthCell(health) {
    const status = (health && health.status) || "healthy";
    const reason = (health && health.reason) || "";
    return el("td", {class: "health health-" + status, "data-health": status, title: reason}, [
      el("span", {class: "health-status", text: status}),
      reason ? el("span", {class: "health-reason muted", text: " " + reason}) : null,
    ].filter(Boolean));
  }

  // -- doctor (plain HTTP, at most every 10 s) -------------------------------------------
  let doctorBusy = false;
  async function refreshDoctor() {
    if (doctorBusy) return;  // the last diagnosis is still gathering reports
    doctorBusy = true;
    const list = $("doctor");
    try {
      const response = await fetch("/api/doctor", {cache: "no-store"});
      if (response.status === 401) { sessionEnded(); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const body = await response.json();
      dashboard.doctor = body;
      $("doctor-count").textContent = body.critical || body.warning
        ? `${body.critical} critical, ${body.warning} warning` : "";
      $("doctor-checked").textContent = "checked " + new Date(body.checked_at * 1000).toLocaleTimeString();
      if (!body.findings.length) {
        list.replaceChildren(el("li", {class: "muted", text: "no findings: the cluster looks healthy"}));
        return;
      }
      list.replaceChildren(...body.findings.map((f) => el("li", {
        class: "finding finding-" + f.severity, "data-severity": f.severity,
        "data-check": f.check, "data-subject": f.subject}, [
        el("span", {class: "severity severity-" + f.severity, text: f.severity}),
        el("span", {class: "finding-message", text: f.message}),
        el("div", {class: "finding-fix muted", text: "fix: " + f.fix}),
      ])));
    } catch (err) {
      list.replaceChildren(el("li", {class: "muted", text: "could not run the doctor: " + err.message}));
    } finally {
      doctorBusy = false;
    }
  }

  // -- tasks (plain HTTP, every 5 s): per queue and per node ------------------------------
  let tasksBusy = false;
  async function refreshTasks() {
    if (tasksBusy) return;
    tasksBusy = true;
    const queues = $("task-queues").querySelector("tbody");
    const nodes = $("task-nodes").querySelector("tbody");
    try {
      const response = await fetch("/api/tasks/stats", {cache: "no-store"});
      if (response.status === 401) { sessionEnded(); return; }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const body = await response.json();
      dashboard.tasks = body;
      const names = Object.keys(body.queues || {}).sort();
      const total = {pending: 0, running: 0, done: 0};
      queues.replaceChildren(...(names.length ? names.map((name) => {
        const q = body.queues[name];
        total.pending += q.pending || 0;
        total.running += q.running || 0;
        total.done += (q.succeeded || 0) + (q.failed || 0) + (q.cancelled || 0);
        return el("tr", {"data-queue": name}, [
          el("td", {text: name}), el("td", {class: "num", text: String(q.pending || 0)}),
          el("td", {class: "num", text: String(q.running || 0)}),
          el("td", {class: "num", text: String(q.succeeded || 0)}),
          el("td", {class: "num", text: String(q.failed || 0)}),
          el("td", {class: "num", text: String(q.cancelled || 0)})]);
      }) : [el("tr", {}, [el("td", {colspan: "6", class: "muted", text: "no task queues yet"})])]));
      nodes.replaceChildren(...(body.nodes || []).map((n) => {
        if (n.error) {
          return el("tr", {"data-node": text(n.node)}, [el("td", {text: text(n.node)}),
            el("td", {colspan: "5", class: "muted", text: text(n.error)})]);
        }
        const qs = Object.values(n.queues || {});
        const sum = (key) => qs.reduce((acc, q) => acc + (q[key] || 0), 0);
        return el("tr", {"data-node": text(n.node)}, [
          el("td", {text: text(n.node)}), el("td", {class: "num", text: String(n.running || 0)}),
          el("td", {class: "num", text: `${n.free_slots ?? 0} / ${n.slots ?? 0}`}),
          el("td", {text: n.claiming ? "yes" : "no"}),
          el("td", {class: "num", text: String(sum("pending"))}),
          el("td", {class: "num", text: String(sum("succeeded") + sum("failed") + sum("cancelled"))})]);
      }));
      $("tasks-summary").textContent = `${total.pending} pending, ${total.running} running, ${total.done} done`;
    } catch (err) {
      queues.replaceChildren(el("tr", {}, [el("td", {colspan: "6", class: "muted",
        text: "could not read the task stats: " + err.message})]));
    } finally {
      tasksBusy = false;
    }
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
      if (response.status === 401) { sessionEnded(); return; }
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

  let retryTimer = null;

  function connect() {
    clearTimeout(retryTimer);
    const source = new EventSource("/api/dashboard/stream");
    dashboard.source = source;
    source.addEventListener("snapshot", onSnapshot);
    // The server ends the stream this way when the session expires or is revoked.
    source.addEventListener("unauthenticated", sessionEnded);
    source.onopen = () => setConnection("live", "live");
    // EventSource reconnects by itself (the server asks for 2 s). A refused stream closes
    // it for good: 401 (the session ended) or 503 (too many dashboards open on this node);
    // whoami tells the two apart.
    source.onerror = () => {
      if (dashboard.source !== source) return;  // an old stream, already replaced
      if (source.readyState === EventSource.CLOSED) {
        setConnection("lost", "disconnected");
        recheck();
      } else {
        setConnection("lost", "connection lost: reconnecting…");
      }
    };
  }

  async function recheck() {
    try {
      const who = await whoami();
      if (who.loginNeeded) { sessionEnded(); return; }
    } catch (err) {
      // Unreachable: retry the stream below, which ends up here again if still down.
    }
    setConnection("lost", `disconnected: retrying in ${RETRY_MS / 1000} s`);
    retryTimer = setTimeout(connect, RETRY_MS);
  }

  // -- session -----------------------------------------------------------------------------
  let chartsMade = false;
  let keyspacesTimer = null;
  let doctorTimer = null;
  let tasksTimer = null;
  let lockoutTimer = null;

  // An error's code, message and retry time, whichever shape the node answers in
  // ({"error": "code", "message"} or {"error": {"code", "message", "retry_after_s"}}).
  function failure(response, answer) {
    const error = answer && answer.error;
    const nested = error && typeof error === "object" ? error : {};
    const code = typeof error === "string" ? error : text(nested.code);
    const message = text(nested.message || (answer && answer.message));
    let retry = Number(nested.retry_after_s ?? (answer && answer.retry_after_s));
    if (!Number.isFinite(retry) || retry <= 0) retry = Number(response.headers.get("Retry-After")) || 0;
    return {code, message, retryAfter: Math.ceil(retry)};
  }

  // {loginNeeded: true} or {enabled, user, roles, expires_at}; throws when unreachable.
  async function whoami() {
    const response = await fetch("/v1/auth/whoami", {cache: "no-store", credentials: "same-origin"});
    if (response.status === 401) return {loginNeeded: true};
    if (response.status === 404) return {enabled: false, user: null};  // a node without auth routes
    const answer = await response.json().catch(() => null);
    if (!response.ok || !answer) {
      const {code, message} = failure(response, answer);
      throw new Error(message || code || "HTTP " + response.status);
    }
    const enabled = answer.auth !== false && answer.user !== null && answer.user !== undefined;
    return {enabled, user: enabled ? String(answer.user) : null, roles: answer.roles || [],
            expires_at: answer.expires_at || null};
  }

  function showNotice(message) {
    $("notice").textContent = message;
    $("notice").hidden = !message;
  }

  function stopDashboard() {
    if (dashboard.source) dashboard.source.close();
    dashboard.source = null;
    clearTimeout(retryTimer);
    clearInterval(keyspacesTimer);
    keyspacesTimer = null;
    clearInterval(doctorTimer);
    doctorTimer = null;
    clearInterval(tasksTimer);
    tasksTimer = null;
  }

  function showDashboard(who) {
    dashboard.auth = {enabled: who.enabled, user: who.user, roles: who.roles || [],
                      expires_at: who.expires_at || null};
    $("login").hidden = true;
    $("served").hidden = false;
    $("session").hidden = !who.enabled;
    $("user-name").textContent = who.user || "";
    $("auth-note").textContent = who.enabled
      ? "Authentication is on" + (who.expires_at
        ? `: this session lasts until ${new Date(who.expires_at * 1000).toLocaleString()}.` : ".")
      : "Authentication is not enabled on this cluster: anyone who reaches this port sees this page.";
    $("dashboard").hidden = false;
    // Charts are made once the dashboard is visible: ECharts sizes them on creation.
    if (!chartsMade) {
      CHARTS.forEach(makeChart);
      makeRing();
      chartsMade = true;
    } else {
      resizeCharts();
    }
    stopDashboard();
    refreshKeyspaces();
    keyspacesTimer = setInterval(refreshKeyspaces, KEYSPACES_EVERY_MS);
    refreshDoctor();
    doctorTimer = setInterval(refreshDoctor, DOCTOR_EVERY_MS);
    refreshTasks();
    tasksTimer = setInterval(refreshTasks, TASKS_EVERY_MS);
    setConnection("connecting", "connecting…");
    connect();
  }

  function showLogin(message) {
    stopDashboard();
    dashboard.auth = {enabled: true, user: null, roles: [], expires_at: null};
    $("dashboard").hidden = true;
    $("served").hidden = true;  // a node's name is for those logged in
    $("session").hidden = true;
    $("auth-note").textContent = "";
    $("node-name").textContent = "…";
    dashboard.node = null;  // the next snapshot names the node again
    setConnection("connecting", "not logged in");
    $("updated").textContent = "";
    $("login").hidden = false;
    $("login-password").value = "";
    $("login-totp").value = "";
    $("totp-row").hidden = true;
    loginMessage(message || "", "info");
    ($("login-user").value ? $("login-password") : $("login-user")).focus();
  }

  function sessionEnded() {
    showLogin("Your session has ended (it expired or was revoked). Log in again.");
  }

  function loginMessage(message, kind) {
    const box = $("login-error");
    box.textContent = message;
    box.className = "login-error " + (kind || "error");
  }

  function setBusy(busy) {
    const button = $("login-submit");
    button.disabled = busy || lockoutTimer !== null;
    button.textContent = busy ? "Logging in…" : "Log in";
    $("login-form").setAttribute("aria-busy", busy ? "true" : "false");
  }

  // Too many failed attempts: the button stays disabled until the node accepts logins again.
  function lockout(seconds) {
    clearInterval(lockoutTimer);
    let left = Math.max(1, seconds || RETRY_MS / 1000);
    const tick = () => {
      if (left <= 0) {
        clearInterval(lockoutTimer);
        lockoutTimer = null;
        setBusy(false);
        loginMessage("You can try again now.", "info");
        return;
      }
      loginMessage(`Too many failed attempts. Try again in ${left} s.`, "error");
      left -= 1;
    };
    lockoutTimer = setInterval(tick, 1000);
    setBusy(false);
    tick();
  }

  async function login(event) {
    event.preventDefault();
    if (lockoutTimer !== null) return;
    const user = $("login-user").value.trim();
    const password = $("login-password").value;
    const totpShown = !$("totp-row").hidden;
    const totp = $("login-totp").value.trim();
    if (!user || !password) {
      loginMessage("Enter your user name and your password.", "error");
      (user ? $("login-password") : $("login-user")).focus();
      return;
    }
    if (totpShown && !totp) {
      loginMessage("Enter the code from your authenticator app.", "error");
      $("login-totp").focus();
      return;
    }
    const body = {user, password};
    if (totpShown) body.totp = totp;
    setBusy(true);
    loginMessage("", "info");
    let response, answer;
    try {
      response = await fetch("/v1/auth/login", {
        method: "POST", cache: "no-store", credentials: "same-origin",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      answer = await response.json().catch(() => null);
    } catch (err) {
      setBusy(false);
      loginMessage(`Could not reach this node (${err.message}). Check the connection and try again.`, "error");
      return;
    }
    setBusy(false);
    if (response.ok) {
      $("login-password").value = "";
      $("login-totp").value = "";
      start(true);
      return;
    }
    const {code, message, retryAfter} = failure(response, answer);
    if (code === "totp_required") {
      $("totp-row").hidden = false;
      loginMessage("Enter the code from your authenticator app to finish logging in.", "info");
      $("login-totp").focus();
    } else if (code === "bad_credentials") {
      // The node never says which part was wrong; neither does the page.
      loginMessage(totpShown ? "Wrong user name, password or authenticator code."
                             : "Wrong user name or password.", "error");
      $("login-password").value = "";
      $("login-totp").value = "";
      $("login-password").focus();
    } else if (code === "too_many_attempts" || response.status === 429) {
      lockout(retryAfter);
    } else {
      loginMessage(`The node refused the login: ${message || code || "HTTP " + response.status}`, "error");
    }
  }

  async function logout() {
    const button = $("logout");
    button.disabled = true;
    stopDashboard();
    setConnection("connecting", "logging out…");
    let problem = "";
    try {
      const response = await fetch("/v1/auth/logout", {method: "POST", cache: "no-store",
                                                        credentials: "same-origin"});
      if (!response.ok) {
        const {code, message} = failure(response, await response.json().catch(() => null));
        problem = message || code || "HTTP " + response.status;
      }
      // Logged out only when the node no longer knows this browser's session: a refused
      // logout (or one that left the cookie valid) must not look like one that worked.
      if ((await whoami()).loginNeeded) {
        showNotice("");
        showLogin("You are logged out.");
        return;
      }
      problem = problem || "the node still accepts this session";
    } catch (err) {
      problem = err.message;
    } finally {
      button.disabled = false;
    }
    await start();  // back to the dashboard (or the form, had the session ended meanwhile)
    showNotice(`Could not log out (${problem}): you are still logged in. Try again.`);
  }

  // Ask the node who we are, then show the dashboard or the login form. afterLogin: the
  // node has just accepted a login, so a 401 now means the browser refused its cookie.
  async function start(afterLogin) {
    clearTimeout(retryTimer);
    let who;
    try {
      who = await whoami();
    } catch (err) {
      stopDashboard();
      showNotice(`Could not reach this node (${err.message}); retrying in ${RETRY_MS / 1000} s.`);
      setConnection("lost", "unreachable");
      retryTimer = setTimeout(() => start(afterLogin), RETRY_MS);
      return;
    }
    showNotice("");
    if (!who.loginNeeded) {
      showDashboard(who);
    } else if (afterLogin) {
      showLogin("The node accepted the login but this browser did not keep its session " +
                "cookie (are cookies blocked for this site?).");
    } else {
      showLogin("");
    }
  }

  function resizeCharts() {
    for (const chart of Object.values(dashboard.charts)) chart.resize();
    if (dashboard.ring) dashboard.ring.resize();
  }

  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  window.addEventListener("resize", resizeCharts);
  start(false);
})();
