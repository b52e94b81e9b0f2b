// The Flotilla console: one page, no build step. It talks to /api/v1 with the token the
// operator signs in with (kept in this tab's sessionStorage), polls every few seconds, and
// draws its charts as SVG.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const pill = (s) => `<span class="pill ${esc(s)}">${esc(s)}</span>`;
const num = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const COLORS = ["#2f6fde", "#d64545", "#1f9d55", "#c98a00", "#7b4bd6", "#0f9bb5"];
const ROLES = { viewer: 0, operator: 1, admin: 2 };

let me = null; // { role, id, name }
let timer = null;

async function api(path, opts = {}) {
  return (await apiPage(path, opts)).body;
}

// A page of a list: its items and the next page's cursor (the Flotilla-Next header).
async function apiPage(path, opts = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + sessionStorage.getItem("flotilla-token") }, opts.headers || {});
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 401) {
    signOut("Your token is not accepted any more.");
    throw new Error("unauthorized");
  }
  const text = await r.text();
  const body = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error(body && body.message ? body.message + (body.hint ? " (" + body.hint + ")" : "") : r.statusText);
  return { body, next: r.headers.get("Flotilla-Next") };
}

const can = (role) => me && ROLES[me.role] >= ROLES[role];

function status(msg, bad) {
  const s = $("#status");
  s.textContent = msg;
  s.className = bad ? "error" : "";
}

// ---- sign in ----

function signOut(msg) {
  sessionStorage.removeItem("flotilla-token");
  me = null;
  clearInterval(timer);
  $("#main").innerHTML = "";
  $("#login").hidden = false;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login-error").textContent = msg || "";
}

async function signIn(token) {
  sessionStorage.setItem("flotilla-token", token);
  try {
    me = await api("/api/v1/whoami");
  } catch (e) {
    signOut(e.message === "unauthorized" ? "That token is not valid." : e.message);
    return;
  }
  $("#login").hidden = true;
  $("#logout").hidden = false;
  $("#who").textContent = `${me.name || me.id} · ${me.role}`;
  route();
}

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  signIn($("#token").value.trim());
});
$("#logout").addEventListener("click", () => signOut());

// ---- routing and live updates ----

const pages = [
  [/^#?\/?$/, overview],
  [/^#\/devices$/, devices],
  [/^#\/devices\/(.+)$/, device],
  [/^#\/bundles$/, bundles],
  [/^#\/rollouts$/, rollouts],
  [/^#\/rollouts\/(.+)$/, rollout],
  [/^#\/drift$/, drift],
  [/^#\/retrain$/, retrain],
  [/^#\/retrain\/(.+)$/, job],
];

function route() {
  if (!me) return;
  clearInterval(timer);
  const hash = location.hash || "#/";
  for (const a of document.querySelectorAll("#nav a")) {
    const h = a.getAttribute("href");
    a.classList.toggle("active", h === "#/" ? hash === "#/" : hash.startsWith(h));
  }
  for (const [re, page] of pages) {
    const m = hash.match(re);
    if (m) {
      const main = $("#main");
      main.innerHTML = "";
      const refresh = page(main, ...m.slice(1).map(decodeURIComponent));
      const tick = async () => {
        try {
          await refresh();
          status("updated " + new Date().toLocaleTimeString());
        } catch (e) {
          if (e.message !== "unauthorized") status(e.message, true);
        }
      };
      tick();
      timer = setInterval(tick, 3000);
      return;
    }
  }
  $("#main").innerHTML = "<p>No such page.</p>";
}
window.addEventListener("hashchange", route);

function table(headers, rows) {
  return `<table><thead><tr>${headers.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>${
    rows.length ? rows.map((r) => `<tr>${r.map((c) => `<td>${c}</td>`).join("")}</tr>`).join("") : `<tr><td colspan="${headers.length}" class="muted">none</td></tr>`
  }</tbody></table>`;
}

function section(root, html) {
  const div = document.createElement("div");
  div.innerHTML = html;
  root.appendChild(div);
  return div;
}

// ---- pages ----

function overview(root) {
  section(root, `<h1>Fleet</h1>`);
  const stats = section(root, "");
  const versions = section(root, "");
  const alerts = section(root, "");
  return async () => {
    const [devs, rolls, al] = await Promise.all([api("/api/v1/devices"), api("/api/v1/rollouts"), api("/api/v1/alerts")]);
    const online = devs.filter((d) => d.online).length;
    const byState = {};
    for (const r of rolls) byState[r.state] = (byState[r.state] || 0) + 1;
    stats.innerHTML = `<div class="cards">
      <div class="card stat" id="devices-online"><div class="n ok">${online}</div><div class="l">devices online</div></div>
      <div class="card stat"><div class="n ${devs.length - online ? "bad" : "muted"}">${devs.length - online}</div><div class="l">offline</div></div>
      <div class="card stat"><div class="n">${byState.running || 0}</div><div class="l">rollouts running</div></div>
      <div class="card stat"><div class="n ${al.length ? "bad" : "muted"}">${al.length}</div><div class="l">drift alerts firing</div></div>
    </div>`;
    const counts = {};
    for (const d of devs) for (const m of d.models) counts[`${m.name}@${m.version}`] = (counts[`${m.name}@${m.version}`] || 0) + 1;
    versions.innerHTML = `<h2>Versions running</h2>` + table(["model", "devices", "share"], Object.entries(counts).sort().map(([k, n]) =>
      [esc(k), n, `<span class="bar"><span style="width:${(100 * n) / Math.max(devs.length, 1)}%"></span></span>`]));
    alerts.innerHTML = `<h2>Drift alerts</h2>` + table(["model", "cohort", "signal", "value", "threshold", "windows", "since"], al.map((a) =>
      [esc(`${a.model}@${a.version}`), esc(a.cohort), esc(a.signal), num(a.value, 2), num(a.threshold, 2), a.windows, esc(a.raised)]));
  };
}

// Devices per page of the devices list (the API pages by id).
const PAGE = 200;

function devices(root) {
  section(root, `<h1>Devices</h1><form class="inline" id="filter"><label>Selector <input id="selector" placeholder="group=lab,arch=aarch64" size="32"></label><button type="submit" class="secondary">Filter</button></form><p></p>`);
  const list = section(root, "");
  const pager = section(root, `<button id="prev-page" class="secondary" disabled>Previous</button> <span id="page-no"></span> <button id="next-page" class="secondary" disabled>Next</button>`);
  let sel = "";
  // Cursors of the pages seen so far: pages[i] is the `after` of page i (page 0: none).
  let pages = [null], at = 0, next = null;
  const go = (i) => { at = i; refresh().catch((err) => status(err.message, true)); };
  $("#filter").addEventListener("submit", (e) => {
    e.preventDefault();
    sel = $("#selector").value.trim();
    pages = [null];
    go(0);
  });
  $("#prev-page", pager).addEventListener("click", () => go(Math.max(0, at - 1)));
  $("#next-page", pager).addEventListener("click", () => { if (next) { pages[at + 1] = next; go(at + 1); } });
  const refresh = async () => {
    const q = [`limit=${PAGE}`];
    if (sel) q.push("selector=" + encodeURIComponent(sel));
    if (pages[at]) q.push("after=" + encodeURIComponent(pages[at]));
    const page = await apiPage("/api/v1/devices?" + q.join("&"));
    const devs = page.body;
    next = page.next;
    $("#prev-page", pager).disabled = at === 0;
    $("#next-page", pager).disabled = !next;
    $("#page-no", pager).textContent = at || next ? `page ${at + 1}` : "";
    list.innerHTML = table(["device", "state", "arch", "runtimes", "tags", "models", "last seen"], devs.map((d) => [
      `<a href="#/devices/${encodeURIComponent(d.id)}">${esc(d.id)}</a>`,
      pill(d.online ? "online" : "offline"), esc(d.arch), esc(d.runtimes.join(", ")),
      Object.entries(d.tags).map(([k, v]) => pill(`${k}=${v}`)).join(""),
      d.models.map((m) => esc(`${m.name}@${m.version} (${m.status})`)).join("<br>"), esc(d.last_seen),
    ]));
  };
  return refresh;
}

function device(root, id) {
  section(root, `<h1>Device ${esc(id)}</h1>`);
  const info = section(root, "");
  const history = section(root, "");
  return async () => {
    const [d, ev] = await Promise.all([api("/api/v1/devices/" + encodeURIComponent(id)), api("/api/v1/events?device=" + encodeURIComponent(id) + "&limit=50")]);
    info.innerHTML = `<div class="card">${pill(d.online ? "online" : "offline")} agent ${esc(d.agent_version)} on ${esc(d.arch)} · runtimes ${esc(d.runtimes.join(", "))}
      · tags ${Object.entries(d.tags).map(([k, v]) => pill(`${k}=${v}`)).join("") || "none"}</div>` +
      table(["model", "version", "status", "backend"], d.models.map((m) => [esc(m.name), m.version, pill(m.status), esc(m.backend || "")]));
    history.innerHTML = `<h2>History</h2>` + table(["time", "event", "detail"], ev.map((e) => [esc(e.at), esc(e.kind), `<code>${esc(JSON.stringify(e.detail)).slice(0, 200)}</code>`]));
  };
}

function bundles(root) {
  section(root, `<h1>Models and bundles</h1>`);
  const list = section(root, "");
  return async () => {
    const bs = await api("/api/v1/bundles");
    bs.sort((a, b) => a.name.localeCompare(b.name) || b.version - a.version);
    list.innerHTML = table(["model", "version", "size", "signed by", "created", "pushed"], bs.map((b) => [
      esc(b.name), b.version, `${(b.size / 1024).toFixed(1)} KiB`, b.signers.map((k) => `<code title="${esc(k)}">${esc(k.slice(0, 12))}</code>`).join(" "), esc(b.created), esc(b.pushed),
    ]));
  };
}

function rollouts(root) {
  section(root, `<h1>Rollouts</h1>`);
  if (can("operator")) {
    const form = section(root, `<div class="card"><h2>Start a rollout</h2><form class="inline" id="start-rollout">
      <label>Bundle <select id="ro-bundle"></select></label>
      <label>Waves <input id="ro-waves" value="1,100%" size="12"></label>
      <label>Bake <input id="ro-bake" value="30s" size="5"></label>
      <label>Gates <input id="ro-gates" value="install_success>=1" size="30"></label>
      <label>On failure <select id="ro-failure"><option>pause</option><option>rollback</option></select></label>
      <button type="submit" id="ro-start">Start</button></form><p class="error" id="ro-error"></p></div>`);
    api("/api/v1/bundles").then((bs) => {
      $("#ro-bundle", form).innerHTML = bs.map((b) => `<option>${esc(b.name)}@${b.version}</option>`).join("");
    });
    $("#start-rollout", form).addEventListener("submit", async (e) => {
      e.preventDefault();
      const secs = (t) => { const m = t.match(/^(\d+)\s*(s|m|h)?$/); return m ? Number(m[1]) * ({ s: 1, m: 60, h: 3600 }[m[2] || "s"]) : 0; };
      const plan = {
        waves: $("#ro-waves").value.split(",").map((w) => w.trim()).filter(Boolean),
        bake_secs: secs($("#ro-bake").value.trim()),
        gates: $("#ro-gates").value.split(/[,;]\s*(?=[a-z_]+\s*[<>=])/).map((g) => g.trim()).filter(Boolean),
        on_failure: $("#ro-failure").value,
      };
      try {
        const r = await api("/api/v1/rollouts", { method: "POST", json: { bundle: $("#ro-bundle").value, plan } });
        location.hash = "#/rollouts/" + r.id;
      } catch (err) {
        $("#ro-error").textContent = err.message;
      }
    });
  }
  const list = section(root, "");
  return async () => {
    const rs = await api("/api/v1/rollouts");
    list.innerHTML = table(["rollout", "bundle", "state", "wave", "progress", "reason"], rs.map((r) => [
      `<a href="#/rollouts/${esc(r.id)}">${esc(r.id)}</a>`, esc(r.bundle), pill(r.state), `${r.current_wave} of ${r.waves.length}`,
      `<span class="bar"><span style="width:${(100 * r.succeeded) / Math.max(r.total, 1)}%"></span></span> ${r.succeeded}/${r.total}`, esc(r.reason || ""),
    ]));
  };
}

function rollout(root, id) {
  const head = section(root, "");
  const buttons = section(root, "");
  const waves = section(root, "");
  const devs = section(root, "");
  if (can("operator")) {
    buttons.innerHTML = ["pause", "resume", "promote", "abort", "rollback"].map((c) =>
      `<button id="ro-${c}" class="${c === "abort" || c === "rollback" ? "danger" : "secondary"}" data-cmd="${c}">${c}</button>`).join("") + `<span class="error" id="cmd-error"></span>`;
    buttons.addEventListener("click", async (e) => {
      const cmd = e.target.dataset && e.target.dataset.cmd;
      if (!cmd) return;
      try {
        await api(`/api/v1/rollouts/${encodeURIComponent(id)}/${cmd}`, { method: "POST", json: {} });
        $("#cmd-error").textContent = "";
        await refresh();
      } catch (err) {
        $("#cmd-error").textContent = err.message;
      }
    });
  }
  const refresh = async () => {
    const r = await api("/api/v1/rollouts/" + encodeURIComponent(id));
    head.innerHTML = `<h1>Rollout ${esc(r.id)} of ${esc(r.bundle)}</h1><p>State <span id="rollout-state">${pill(r.state)}</span> · wave ${r.current_wave} of ${r.waves.length}
      · ${r.succeeded} of ${r.total} succeeded, ${r.failed} failed${r.reason ? ` · <span class="bad">${esc(r.reason)}</span>` : ""}</p>`;
    waves.innerHTML = `<h2>Waves</h2>` + table(["wave", "size", "progress", "status", "gates (measured vs threshold)"], r.waves.map((w, i) => [
      `${i + 1} (${esc(w.spec)})`, w.size,
      `<span class="bar"><span style="width:${(100 * w.succeeded) / Math.max(w.size, 1)}%"></span></span> ${w.succeeded} ok, ${w.failed} failed, ${w.offered} offered`,
      pill(w.status),
      w.gates.map((g) => `<div>${g.passed ? '<span class="ok">✔</span>' : g.value === null || g.value === undefined ? '<span class="muted">…</span>' : '<span class="bad">✘</span>'} ${esc(g.name)}: ${num(g.value)} vs ${num(g.threshold)}</div>`).join("") || '<span class="muted">not judged yet</span>',
    ]));
    devs.innerHTML = `<h2>Devices</h2>` + table(["device", "state", "reason"], r.devices.map((d) => [esc(d.device), pill(d.state), esc(d.reason || "")]));
  };
  return refresh;
}

// ---- drift ----

function lineChart(series, { title, height = 180, width = 720, threshold } = {}) {
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return `<p class="muted">No scored windows yet.</p>`;
  const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y).concat(threshold ? [threshold] : []);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y1 = Math.max(...ys, 1e-9) * 1.1;
  const L = 44, B = 22, W = width - L - 10, H = height - B - 10;
  const X = (x) => L + (x1 === x0 ? W / 2 : ((x - x0) / (x1 - x0)) * W), Y = (y) => 10 + H - (y / y1) * H;
  let svg = `<svg class="chart" width="${width}" height="${height}" role="img" aria-label="${esc(title)}">`;
  for (let i = 0; i <= 4; i++) {
    const y = (y1 * i) / 4;
    svg += `<line x1="${L}" x2="${L + W}" y1="${Y(y)}" y2="${Y(y)}" stroke="#eef2f6"/><text x="${L - 6}" y="${Y(y) + 4}" text-anchor="end">${y.toFixed(2)}</text>`;
  }
  if (threshold) svg += `<line x1="${L}" x2="${L + W}" y1="${Y(threshold)}" y2="${Y(threshold)}" stroke="#d64545" stroke-dasharray="4 3"/><text x="${L + W}" y="${Y(threshold) - 4}" text-anchor="end">threshold ${threshold}</text>`;
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    const d = s.points.map((p, k) => `${k ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join("");
    svg += `<path class="series" d="${d}" fill="none" stroke="${c}" stroke-width="2"/>` + s.points.map((p) => `<circle cx="${X(p.x).toFixed(1)}" cy="${Y(p.y).toFixed(1)}" r="2.5" fill="${c}"><title>${esc(s.name)} ${p.y.toFixed(3)}</title></circle>`).join("");
  });
  svg += `<text x="${L}" y="${height - 4}">${esc(new Date(x0).toLocaleTimeString())}</text><text x="${L + W}" y="${height - 4}" text-anchor="end">${esc(new Date(x1).toLocaleTimeString())}</text></svg>`;
  const legend = series.map((s, i) => `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${esc(s.name)}</span>`).join("");
  return `<div class="legend">${legend}</div>${svg}`;
}

function histogramChart(h, { width = 720, height = 180 } = {}) {
  const total = (v) => Math.max(v.reduce((a, b) => a + b, 0), 1);
  const b = h.baseline.map((v) => v / total(h.baseline)), l = h.live.map((v) => v / total(h.live));
  const n = b.length, ymax = Math.max(...b, ...l, 1e-9) * 1.1;
  const L = 44, B = 30, W = width - L - 10, H = height - B - 10, bw = W / n;
  let svg = `<svg class="chart histogram" width="${width}" height="${height}" role="img" aria-label="baseline vs live">`;
  for (let i = 0; i < n; i++) {
    const x = L + i * bw;
    svg += `<rect class="baseline" x="${(x + bw * 0.1).toFixed(1)}" y="${(10 + H - (b[i] / ymax) * H).toFixed(1)}" width="${(bw * 0.4).toFixed(1)}" height="${((b[i] / ymax) * H).toFixed(1)}" fill="#9aa9ba"><title>baseline ${(100 * b[i]).toFixed(1)}%</title></rect>`;
    svg += `<rect class="live" x="${(x + bw * 0.5).toFixed(1)}" y="${(10 + H - (l[i] / ymax) * H).toFixed(1)}" width="${(bw * 0.4).toFixed(1)}" height="${((l[i] / ymax) * H).toFixed(1)}" fill="#2f6fde"><title>live ${(100 * l[i]).toFixed(1)}%</title></rect>`;
    const label = i === 0 ? `< ${h.edges[0]?.toFixed(2)}` : i === n - 1 ? `≥ ${h.edges[n - 2]?.toFixed(2)}` : `${h.edges[i - 1].toFixed(2)}`;
    if (n <= 16 || i % 2 === 0) svg += `<text x="${(x + bw / 2).toFixed(1)}" y="${height - 12}" text-anchor="middle">${esc(label)}</text>`;
  }
  svg += `<text x="${L - 6}" y="18" text-anchor="end">${(100 * ymax).toFixed(0)}%</text></svg>`;
  return `<div class="legend"><span><i style="background:#9aa9ba"></i>baseline</span><span><i style="background:#2f6fde"></i>live (latest window)</span></div>${svg}`;
}

function drift(root) {
  section(root, `<h1>Drift</h1><form class="inline" id="drift-form"><label>Model <select id="drift-model"></select></label>
    <label>Signal <select id="drift-signal"></select></label></form>`);
  const charts = section(root, "");
  const hist = section(root, "");
  let options = [];
  api("/api/v1/bundles").then((bs) => {
    options = [...new Set(bs.map((b) => `${b.name}@${b.version}`))].sort().reverse();
    $("#drift-model").innerHTML = options.map((o) => `<option>${esc(o)}</option>`).join("");
  });
  for (const id of ["#drift-model", "#drift-signal"]) $(id).addEventListener("change", () => refresh().catch((e) => status(e.message, true)));
  const refresh = async () => {
    const choice = $("#drift-model").value;
    if (!choice) {
      charts.innerHTML = `<p class="muted">No bundles yet.</p>`;
      return;
    }
    const [name, version] = choice.split("@");
    const rows = await api(`/api/v1/drift?model=${encodeURIComponent(name)}&version=${version}&last=30&histograms=true`);
    const signals = [...new Set(rows.map((r) => r.signal))];
    const sigSel = $("#drift-signal");
    if (sigSel.options.length !== signals.length) {
      const keep = sigSel.value;
      sigSel.innerHTML = signals.map((s) => `<option>${esc(s)}</option>`).join("");
      if (signals.includes(keep)) sigSel.value = keep;
    }
    const signal = sigSel.value || signals[0];
    const mine = rows.filter((r) => r.signal === signal);
    const cohorts = [...new Set(mine.map((r) => r.cohort))].sort();
    const series = (metric) => cohorts.map((c) => ({
      name: c || "all devices",
      points: mine.filter((r) => r.cohort === c && r[metric] !== null && r[metric] !== undefined).map((r) => ({ x: Date.parse(r.window_end), y: r[metric] })),
    }));
    charts.innerHTML = `<div class="card" id="psi-chart"><h2>PSI of ${esc(signal)} per window</h2>${lineChart(series("psi"), { title: "PSI", threshold: 0.2 })}</div>
      <div class="card"><h2>Jensen–Shannon distance of ${esc(signal)}</h2>${lineChart(series("js"), { title: "JS" })}</div>`;
    hist.innerHTML = cohorts.map((c) => {
      const latest = mine.filter((r) => r.cohort === c && r.histogram).pop();
      return latest ? `<div class="card"><h2>${esc(signal)}, ${esc(c || "all devices")}: baseline vs live</h2>${histogramChart(latest.histogram)}</div>` : "";
    }).join("");
  };
  return refresh;
}

// ---- retraining ----

function retrain(root) {
  section(root, `<h1>Retraining jobs</h1>`);
  const list = section(root, "");
  const policies = section(root, "");
  return async () => {
    const [jobs, ps] = await Promise.all([api("/api/v1/retrain/jobs"), api("/api/v1/retrain/policies")]);
    list.innerHTML = table(["job", "model", "state", "versions", "samples", "must beat", "rollout", "created"], jobs.map((j) => {
      const beat = j.evaluation.find((e) => e.role === "beat");
      return [`<a href="#/retrain/${esc(j.id)}">${esc(j.id)}</a>`, esc(j.model), pill(j.state), `v${j.base_version} → ${j.candidate_version ? "v" + j.candidate_version : "?"}`,
        `${j.samples_train} + ${j.samples_heldout} held out`, beat ? `${num(beat.current)} → ${num(beat.candidate)}` : "–",
        j.rollout_id ? `<a href="#/rollouts/${esc(j.rollout_id)}">${esc(j.rollout_id)}</a>` : "–", esc(j.created)];
    }));
    policies.innerHTML = `<h2>Policies</h2>` + table(["model", "trigger", "trainer", "evaluation", "approval"], ps.map((p) => [
      esc(p.model), p.trigger.on_alert ? "drift alert" : "manual", esc(p.trainer.webhook || p.trainer.command.join(" ")),
      esc(`${p.evaluation.metric} on ${p.evaluation.heldout} (+${p.evaluation.min_improvement})`), esc(p.rollout.approval)]));
  };
}

function job(root, id) {
  const head = section(root, "");
  const buttons = section(root, "");
  const body = section(root, "");
  if (can("operator")) {
    buttons.innerHTML = `<button id="job-approve">approve</button><button id="job-cancel" class="danger">cancel</button><span class="error" id="job-error"></span>`;
    buttons.addEventListener("click", async (e) => {
      const cmd = e.target.id === "job-approve" ? "approve" : e.target.id === "job-cancel" ? "cancel" : null;
      if (!cmd) return;
      try {
        await api(`/api/v1/retrain/jobs/${encodeURIComponent(id)}/${cmd}`, { method: "POST" });
        await refresh();
      } catch (err) {
        $("#job-error").textContent = err.message;
      }
    });
  }
  const refresh = async () => {
    const j = await api("/api/v1/retrain/jobs/" + encodeURIComponent(id));
    head.innerHTML = `<h1>Job ${esc(j.id)} for ${esc(j.model)}</h1><p>${pill(j.state)} ${esc(j.reason || "")}</p><p class="muted">${esc(j.trigger)} · samples from ${esc(j.selector)}</p>`;
    body.innerHTML = `<h2>Evaluation</h2>` + table(["set", "role", "samples", "current", "candidate", "verdict"], j.evaluation.map((e) => [
      esc(e.set), esc(e.role), e.samples, num(e.current), num(e.candidate), e.passed ? '<span class="ok">passed</span>' : '<span class="bad">failed</span>'])) +
      `<h2>History</h2><ul>${j.history.map((h) => `<li>${esc(h)}</li>`).join("")}</ul>`;
  };
  return refresh;
}

// ---- start ----

if (sessionStorage.getItem("flotilla-token")) signIn(sessionStorage.getItem("flotilla-token"));
else signOut();
