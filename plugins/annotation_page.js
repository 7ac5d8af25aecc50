// omeflow annotation page. Plain JS, no build, no external assets. Every request goes to
// this page's own API (relative URLs: works below any base path) with the UI's cookie; every
// POST carries the CSRF header. Data from the server is only ever put in the page as text.
"use strict";
(function () {
  const API = "annotate/api/";
  const CSRF = { "X-Omeflow-Request": "1", "Content-Type": "application/json" };
  const KEY_LABELS = { "1": "positive", p: "positive", "2": "negative", n: "negative",
                       "3": "unsure", u: "unsure" };
  const $ = (id) => document.getElementById(id);
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  };
  const setId = Number(new URLSearchParams(location.search).get("set")) || null;
  const state = {
    summary: null, history: [], pos: -1, skipped: [], undoStack: [], busy: false,
    grid: false, tiles: [], cursor: 0, gridSeen: [], done: false,
  };

  function say(text, error) {
    const m = $("message");
    m.textContent = text || "";
    m.className = error ? "error" : "";
  }

  async function call(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: {} };
    if (method !== "GET") {
      opts.headers = CSRF;
      opts.body = JSON.stringify(body || {});
    }
    const reply = await fetch(API + path, opts);
    if (reply.status === 401) {
      say("Your Airflow login has expired: log in again in the Airflow UI and reload.", true);
      throw new Error("401");
    }
    const data = await reply.json().catch(() => ({}));
    if (!reply.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      say(detail || ("HTTP " + reply.status), true);
      throw new Error(detail);
    }
    return data;
  }

  // -- set list ---------------------------------------------------------------------------
  async function showSets() {
    $("sets").hidden = false;
    const data = await call("GET", "sets");
    const body = $("set-rows");
    body.replaceChildren();
    if (!data.sets.length) {
      const tr = el("tr");
      const td = el("td", "No candidate sets you may read yet: run the celldetector_candidates Dag.");
      td.colSpan = 7;
      tr.append(td);
      body.append(tr);
    }
    for (const s of data.sets) {
      const tr = el("tr", null, "row");
      const link = el("a", "set " + s.id);
      link.href = "annotate?set=" + encodeURIComponent(s.id);
      const first = el("td");
      first.append(link);
      tr.append(first, el("td", s.image_id), el("td", s.rule), el("td", s.run_id),
        el("td", s.labelled + " / " + s.n_candidates), el("td", s.annotators.join(", ") || "–"),
        el("td", (s.created_at || "").slice(0, 16).replace("T", " ")));
      tr.addEventListener("click", () => { location.href = link.href; });
      body.append(tr);
    }
  }

  // -- summary: progress, agreement, exports ------------------------------------------------
  async function refreshSummary() {
    const s = await call("GET", "sets/" + setId);
    state.summary = s;
    $("set-title").textContent = "set " + s.set.id + " · image " + s.set.image_id + " · " +
      s.set.rule + " · " + s.set.n_candidates + " candidates";
    const p = s.progress;
    const box = $("progress");
    box.replaceChildren();
    box.append(el("div", "Image " + s.set.image_id + ": " + p.labelled + " / " + p.total +
      " candidates labelled"));
    const bar = el("div", null, "bar");
    const fill = el("span");
    fill.style.width = (p.total ? (100 * p.labelled / p.total) : 0) + "%";
    bar.append(fill);
    box.append(bar);
    const t = el("table");
    const head = el("tr");
    ["annotator", "labelled", "pos", "neg", "unsure"].forEach((h) => head.append(el("th", h)));
    t.append(head);
    for (const [name, a] of Object.entries(p.annotators)) {
      const tr = el("tr");
      tr.append(el("td", name), el("td", a.labelled), el("td", a.positive),
        el("td", a.negative), el("td", a.unsure));
      t.append(tr);
    }
    box.append(t);
    const ag = $("agreement-table");
    ag.replaceChildren();
    if (!s.agreement.length) {
      ag.textContent = "Shown once two annotators labelled the same candidates.";
    }
    for (const r of s.agreement) {
      const kappa = r.kappa === null ? "undefined" : r.kappa.toFixed(2);
      ag.append(el("div", r.a + " × " + r.b + ": " + r.agree + " / " + r.n + " agree, κ = " + kappa));
      const t2 = el("table");
      const h2 = el("tr");
      h2.append(el("th", r.a + " \\ " + r.b));
      s.labels.forEach((l) => h2.append(el("th", l)));
      t2.append(h2);
      for (const la of s.labels) {
        const tr = el("tr");
        tr.append(el("th", la));
        s.labels.forEach((lb) => tr.append(el("td", ((r.counts[la] || {})[lb]) || 0)));
        t2.append(tr);
      }
      ag.append(t2);
    }
    const ex = $("exports");
    ex.replaceChildren();
    for (const [fmt, hist, text] of [["csv", false, "CSV"], ["parquet", false, "Parquet"],
                                     ["csv", true, "CSV with every revision"]]) {
      const a = el("a", text);
      a.href = API + "sets/" + setId + "/export?format=" + fmt + (hist ? "&history=true" : "");
      ex.append(a, document.createTextNode("  "));
    }
  }

  // -- single view --------------------------------------------------------------------------
  function current() { return state.pos >= 0 ? state.history[state.pos] : null; }

  function showLabel(label) {
    const box = $("current-label");
    box.replaceChildren();
    if (label) {
      box.append(document.createTextNode("Your label: "), el("span", label, "label-" + label));
    } else {
      box.textContent = "Not labelled yet";
    }
  }

  async function show(cand) {
    const c = await call("GET", "candidates/" + cand.id);
    cand.label = c.label;
    const kinds = c.crops.filter((k) => k.zoom === 1).map((k) => k.kind)
      .filter((k) => k !== "composite");
    const order = ["dapi", "marker"];
    kinds.sort((a, b) => (order.indexOf(a) + 1 || 9) - (order.indexOf(b) + 1 || 9) ||
      a.localeCompare(b));
    const src = (kind, zoom) => API + "candidates/" + c.id + "/crops/" +
      encodeURIComponent(kind) + "/" + zoom;
    $("comp1").src = src("composite", 1);
    $("comp2").src = src("composite", 2);
    const ch = $("channels");
    ch.replaceChildren();
    for (const kind of kinds) {
      for (const zoom of [1, 2]) {
        if (!c.crops.some((k) => k.kind === kind && k.zoom === zoom)) continue;
        const f = el("figure");
        const img = el("img");
        img.src = src(kind, zoom);
        img.alt = kind + " zoom " + zoom;
        f.append(img, el("figcaption", kind + (zoom === 1 ? " · close-up" : " · wide")));
        ch.append(f);
      }
    }
    const st = c.stats || {};
    const stat = Object.keys(st).filter((k) => /marker|mean/.test(k)).slice(0, 3)
      .map((k) => k + " " + (typeof st[k] === "number" ? st[k].toFixed(1) : st[k])).join(" · ");
    $("cand-meta").textContent = "candidate " + c.id + " · nucleus " + c.nucleus_id + " at (" +
      Math.round(c.x) + ", " + Math.round(c.y) + ") px · area " + Math.round(c.area) +
      (c.roi ? " · " + c.roi : "") + (stat ? " · " + stat : "") +
      (c.score !== null && c.score !== undefined ? " · uncertainty " + c.score.toFixed(2) : "") +
      "  [" + (state.pos + 1) + " in this session]";
    showLabel(c.label);
    $("done").hidden = true;
    document.querySelector(".views").hidden = false;
  }

  function showDone() {
    state.done = true;
    $("done").hidden = false;
    $("done-hint").textContent = $("agreement").checked ? "" :
      "Tick 'second opinion' to label candidates others labelled (agreement).";
    document.querySelector(".views").hidden = true;
    $("channels").replaceChildren();
    $("cand-meta").textContent = "";
    $("current-label").textContent = "";
  }

  function queueRequest(n, exclude) {
    return { n, order: $("order").value, agreement: $("agreement").checked, exclude };
  }

  async function forward() {
    if (state.pos < state.history.length - 1) {
      state.pos += 1;
      return show(current());
    }
    const seen = state.history.filter((c) => !c.label).map((c) => c.id);
    const data = await call("POST", "sets/" + setId + "/next",
      queueRequest(1, [...new Set([...state.skipped, ...seen])]));
    if (!data.candidates.length) return showDone();
    state.history.push(data.candidates[0]);
    state.pos = state.history.length - 1;
    return show(current());
  }

  async function label(value) {
    const c = current();
    if (!c || state.done) return;
    await call("POST", "candidates/" + c.id + "/label", { label: value });
    c.label = value;
    state.undoStack.push(c.id);
    say("Saved: candidate " + c.id + " " + value);
    refreshSummary().catch(() => {});
    await forward();
  }

  async function undo() {
    const id = state.undoStack.pop();
    if (id === undefined) { say("Nothing to undo in this session."); return; }
    const r = await call("POST", "candidates/" + id + "/undo");
    say("Undone: candidate " + id + (r.current ? " (now " + r.current.label + ")" : ""));
    refreshSummary().catch(() => {});
    if (state.grid) return;
    let at = state.history.findIndex((c) => c.id === id);
    if (at < 0) { state.history.push({ id }); at = state.history.length - 1; }
    state.pos = at;
    state.done = false;
    await show(current());
  }

  async function skip() {
    const c = current();
    if (c && !c.label && !state.skipped.includes(c.id)) state.skipped.push(c.id);
    await forward();
  }

  async function back() {
    if (state.pos <= 0) { say("This is the first candidate of this session."); return; }
    state.pos -= 1;
    state.done = false;
    await show(current());
  }

  // -- grid view ----------------------------------------------------------------------------
  async function loadGrid() {
    const data = await call("POST", "sets/" + setId + "/next",
      queueRequest(16, [...new Set([...state.gridSeen, ...state.skipped])]));
    state.tiles = data.candidates.map((c) => ({ cand: c, marked: false }));
    state.cursor = 0;
    drawGrid();
    if (!state.tiles.length) say("Nothing left to label in this set for you.");
  }

  function drawGrid() {
    const box = $("grid-tiles");
    box.replaceChildren();
    state.tiles.forEach((t, i) => {
      const d = el("div", null, "tile" + (t.marked ? " marked" : "") +
        (i === state.cursor ? " cursor" : ""));
      const img = el("img");
      img.src = API + "candidates/" + t.cand.id + "/crops/composite/1";
      img.alt = "candidate " + t.cand.id;
      d.title = "candidate " + t.cand.id;
      d.append(img);
      d.addEventListener("click", () => { state.cursor = i; t.marked = !t.marked; drawGrid(); });
      box.append(d);
    });
  }

  async function submitGrid() {
    const marked = state.tiles.filter((t) => t.marked);
    for (const t of marked) {
      await call("POST", "candidates/" + t.cand.id + "/label", { label: "negative" });
      state.undoStack.push(t.cand.id);
    }
    state.tiles.filter((t) => !t.marked).forEach((t) => state.gridSeen.push(t.cand.id));
    say("Saved " + marked.length + " negatives; " + (state.tiles.length - marked.length) +
      " left for single view.");
    refreshSummary().catch(() => {});
    await loadGrid();
  }

  async function setMode(grid) {
    state.grid = grid;
    $("grid").hidden = !grid;
    $("single").hidden = grid;
    $("keys-grid").hidden = !grid;
    $("keys-single").hidden = grid;
    $("mode").textContent = grid ? "Single view (g)" : "Grid mode (g)";
    if (grid) {
      await loadGrid();
    } else {
      state.gridSeen = [];
      state.history = state.history.filter((c) => c.label);
      state.pos = state.history.length - 1;
      state.done = false;
      await forward();
    }
  }

  function gridKey(key) {
    const n = state.tiles.length;
    const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -4, ArrowDown: 4 };
    if (key in moves) {
      const to = state.cursor + moves[key];
      if (to >= 0 && to < n) state.cursor = to;
      drawGrid();
      return null;
    }
    if ((key === " " || key === "n") && n) {
      state.tiles[state.cursor].marked = !state.tiles[state.cursor].marked;
      drawGrid();
      return null;
    }
    if (key === "a") {
      const all = state.tiles.every((t) => t.marked);
      state.tiles.forEach((t) => { t.marked = !all; });
      drawGrid();
      return null;
    }
    if (key === "Enter") return submitGrid();
    if (key === "z" || key === "Backspace") return undo();
    if (key === "g" || key === "Escape") return setMode(false);
    return undefined;
  }

  function singleKey(key) {
    if (key in KEY_LABELS) return label(KEY_LABELS[key]);
    if (key === "z" || key === "Backspace") return undo();
    if (key === "ArrowRight" || key === "j") return skip();
    if (key === "ArrowLeft" || key === "k") return back();
    if (key === "g") return setMode(true);
    return undefined;
  }

  document.addEventListener("keydown", (ev) => {
    if (!setId || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "select" || tag === "input") {
      if (ev.key !== "Escape") return;
      ev.target.blur();
    }
    if (state.busy) { ev.preventDefault(); return; }
    const handler = state.grid ? gridKey : singleKey;
    const run = handler(ev.key);
    if (run === undefined) return;
    ev.preventDefault();
    if (run && typeof run.then === "function") {
      state.busy = true;
      document.body.setAttribute("data-busy", "1");
      run.catch(() => {}).finally(() => {
        state.busy = false;
        document.body.removeAttribute("data-busy");
      });
    }
  });

  async function start() {
    if (!setId) {
      for (const id of ["mode", "order", "agreement"]) $(id).closest("label, button").hidden = true;
      return showSets();
    }
    $("work").hidden = false;
    await refreshSummary();
    $("order").value = state.summary.has_scores ? "uncertain" : "random";
    if (!state.summary.can_label) {
      say("You may look at this set but not label it (needs edit access to Dag " +
        state.summary.set.dag_id + ").", true);
      $("single").hidden = true;
      $("mode").hidden = true;
      return;
    }
    $("mode").addEventListener("click", () => setMode(!state.grid));
    for (const id of ["order", "agreement"]) {
      $(id).addEventListener("change", () => {
        state.skipped = [];
        $(id).blur();
        if (state.grid) { loadGrid(); } else { state.history = state.history.filter((c) => c.label);
          state.pos = state.history.length - 1; state.done = false; forward(); }
      });
    }
    await forward();
    document.body.setAttribute("data-ready", "1");
  }

  start().catch((e) => { if (!$("message").textContent) say(String(e), true); });
})();
