// petal review: one card at a time (keyboard first, mouse too) and the feature map.
// Every answer is POSTed at once (in order, one after another) and saved by the server into
// RUN/review.csv or RUN/labeled.csv; a reload asks the server where the review stands.
"use strict";

const TOKEN = document.querySelector('meta[name="petal-token"]').content;
const $ = (id) => document.getElementById(id);
const state = { cards: [], decisions: {}, pos: 0, classes: [], progress: {}, view: "cards" };
let pending = Promise.resolve();  // answers go to the server one after another, in key order

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").className = bad ? "bad" : "";
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Petal-Token": TOKEN } };
  const r = await fetch("api/" + path, init);
  const answer = await r.json();
  if (!r.ok) throw new Error(answer.error || r.statusText);
  return answer;
}

function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

// ------------------------------------------------------------------ cards

const NAMES = { label: "likely label error", outlier: "outlier", duplicate: "duplicate pair",
                new: "new photo", unknown: "none of these? (the model does not recognise it)" };

function baseName(uri) { return uri.split(/[\\/]/).pop(); }
function labeling(card) { return card.kind === "new" || card.kind === "unknown"; }

function showProgress() {
  const p = state.progress;
  $("progress").textContent = `reviewed ${p.reviewed} · left ${p.left} · changed ${p.changed}`;
}

function choices(card) {
  const box = el("div", { className: "choices" });
  const add = (keys, text, action, extra = {}, cls = "") => {
    const b = el("button", { type: "button", className: cls }, el("kbd", { textContent: keys }), text);
    b.addEventListener("click", () => answer(action, extra));
    box.append(b);
  };
  if (card.suggested) add("Enter", `accept: ${card.suggested}`, "accept", {}, "suggested");
  if (!labeling(card)) add("K", "keep as it is", "keep");
  state.classes.slice(0, 9).forEach((c, i) => {
    const current = card.labels.length === 1 && card.labels[0] === c;
    add(String(i + 1), c, "relabel", { label: c }, current ? "current" : "");
  });
  if (labeling(card)) {
    add("C", "new class…", "relabel", { ask: true });
    add("S", "skip", "skip");
  } else if (card.uris.length === 2) {
    add("X", "exclude the left one", "exclude", { which: 0 });
    add("Z", "exclude the right one", "exclude", { which: 1 });
  } else {
    add("X", "exclude it", "exclude");
  }
  return box;
}

function describe(card) {
  const body = el("div", { className: "body" }, el("div", { className: "kind", textContent: NAMES[card.kind] }));
  const line = (text) => body.append(el("div", { textContent: text }));
  if (card.kind === "label") line(`labeled ${card.labels[0]}; the model says ${card.suggested} (score ${card.score.toFixed(2)})`);
  if (card.kind === "outlier") line(`labeled ${card.labels[0]}; ${card.note} (score ${card.score.toFixed(2)})`);
  if (card.kind === "duplicate") line(`${card.note}; similarity ${card.score.toFixed(3)}`);
  if (labeling(card)) line("the model: " + card.top.map(([c, p]) => `${c} ${(100 * p).toFixed(0)}%`).join(", "));
  const d = state.decisions[card.id];
  if (d) body.append(el("div", { className: "done", textContent: `decided: ${d.action}${d.label ? " → " + d.label : ""}` }));
  body.append(choices(card));
  return body;
}

function showCard() {
  const out = $("card");
  const card = state.cards[state.pos];
  out.replaceChildren();
  if (!card) {
    out.className = "";
    out.append(el("p", { textContent: state.cards.length ? "All cards reviewed. Retrain with: petal retrain RUN" : "Nothing to review." }));
    showUpcoming();
    return;
  }
  out.className = "card";
  out.dataset.id = card.id;
  const pics = el("div", { className: "pics" });
  card.uris.forEach((u, i) => pics.append(el("figure", {},
    el("img", { src: `api/image/${card.img[i]}`, alt: baseName(u) }),
    el("figcaption", { textContent: `${baseName(u)}${card.labels[i] ? " · " + card.labels[i] : ""}` }))));
  out.append(pics, describe(card));
  showUpcoming();
}

function showUpcoming() {
  const strip = $("upcoming");
  strip.replaceChildren();
  const from = Math.max(0, state.pos - 3);
  state.cards.slice(from, from + 30).forEach((c, k) => {
    const img = el("img", { src: `api/image/${c.img[0]}?size=96`, alt: c.kind, loading: "lazy" });
    if (from + k === state.pos) img.classList.add("at");
    if (state.decisions[c.id]) img.classList.add("decided");
    img.addEventListener("click", () => { state.pos = from + k; showCard(); });
    strip.append(img);
  });
}

function nextOpen(from) {
  for (let i = from; i < state.cards.length; i++) if (!state.decisions[state.cards[i].id]) return i;
  return state.cards.length;
}

function answer(action, extra = {}) {
  const card = state.cards[state.pos];
  if (!card) return;
  let label = extra.label || "";
  if (extra.ask) {
    label = (prompt("Name of the new class:") || "").trim();
    if (!label) return;
  }
  if (action === "accept" && !card.suggested) return;
  const body = { card: card.id, action, label, which: extra.which ?? null };
  const shown = action === "accept" ? card.suggested : label;
  state.decisions[card.id] = { action, label: shown };  // shown at once; the server answers in order
  state.pos = nextOpen(state.pos + 1);
  showCard();
  send("decide", body);
}

function send(path, body) {
  let t0 = 0;
  pending = pending.then(() => { t0 = performance.now(); return api(path, body); }).then((p) => {
    (window.petalTimings = window.petalTimings || []).push(performance.now() - t0);  // ms a POST took
    state.progress = p;
    if (p.classes) state.classes = p.classes;
    showProgress();
    document.body.dataset.saved = String(Number(document.body.dataset.saved || 0) + 1);
    return p;
  }).catch((e) => { setStatus("not saved: " + e.message, true); return load(); });
  return pending;
}

function undo() {
  send("undo", {}).then((p) => {
    if (!p || p.undone === undefined) return;
    if (p.undone) {
      delete state.decisions[p.undone];
      const at = state.cards.findIndex((c) => c.id === p.undone);
      if (at >= 0) state.pos = at;
    } else {
      reloadDecisions();
    }
    showCard();
    if (state.view === "map") refreshMap();
  });
}

async function reloadDecisions() {
  const data = await api("cards");
  state.decisions = data.decisions;
  state.progress = data.progress;
  showProgress();
  showCard();
}

function cardKey(e) {
  const card = state.cards[state.pos];
  const k = e.key.toLowerCase();
  if (/^[1-9]$/.test(e.key) && state.classes[Number(e.key) - 1]) {
    answer("relabel", { label: state.classes[Number(e.key) - 1] });
  } else if (e.key === "Enter" || k === "a") answer("accept");
  else if (k === "k" && card && !labeling(card)) answer("keep");
  else if (k === "x" && card && !labeling(card)) answer("exclude", { which: card.uris.length === 2 ? 0 : null });
  else if (k === "z" && card && card.uris.length === 2) answer("exclude", { which: 1 });
  else if (k === "s" && card && labeling(card)) answer("skip");
  else if (k === "c" && card && labeling(card)) answer("relabel", { ask: true });
  else if (k === "n" || e.key === "ArrowRight" || e.key === " ") { state.pos = Math.min(state.pos + 1, state.cards.length); showCard(); }
  else if (k === "p" || e.key === "ArrowLeft") { state.pos = Math.max(state.pos - 1, 0); showCard(); }
  else return false;
  return true;
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.metaKey || (e.ctrlKey && e.key.toLowerCase() !== "z")) return;
  const k = e.key.toLowerCase();
  let used = true;
  if (k === "u" || e.key === "Backspace" || (e.ctrlKey && k === "z")) undo();
  else if (k === "m") showView(state.view === "map" ? "cards" : "map");
  else used = state.view === "map" ? PetalMap.key(e) : cardKey(e);
  if (used) e.preventDefault();
});

function showView(view) {
  state.view = view;
  $("cards-view").hidden = view !== "cards";
  $("map-view").hidden = view !== "map";
  $("tab-cards").classList.toggle("on", view === "cards");
  $("tab-map").classList.toggle("on", view === "map");
  if (view === "map") PetalMap.open();
}

function refreshMap() { PetalMap.refresh(); }

async function load() {
  const data = await api("cards");
  Object.assign(state, { cards: data.cards, decisions: data.decisions, progress: data.progress,
                         classes: data.progress.classes });
  $("run").textContent = data.run;
  state.pos = nextOpen(0);
  showProgress();
  showCard();
  $("keys").replaceChildren(...[["Enter", "accept"], ["K", "keep"], ["1–9", "label"], ["X/Z", "exclude"],
    ["S", "skip"], ["U", "undo"], ["N/→", "next"], ["P/←", "back"], ["M", "map"]].map(([k, t]) =>
    el("span", {}, el("kbd", { textContent: k }), t + "  ")));
  document.body.dataset.ready = "1";
}

// ------------------------------------------------------------------ the feature map

const PetalMap = (() => {
  const canvas = $("map"), ctx = canvas.getContext("2d"), tip = $("tip");
  const W = canvas.width, H = canvas.height, PAD = 12, CELL = 8;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"];
  let pts = null, grid = null, base = null, selected = new Set(), drag = null;

  let X = null, Y = null, byLabel = null;  // pixel positions, and the points sorted by label: once per map
  const px = (i) => X[i];
  const py = (i) => Y[i];
  const color = (lab) => lab < 0 ? "#999" : PALETTE[lab % PALETTE.length];

  async function open() {
    if (!pts) {
      pts = await api("map");
      buildGrid();
      legend();
    }
    refresh();
  }

  function buildGrid() {  // a bucket per CELL px: hovering finds the nearest point among a few
    const n = pts.x.length;
    X = new Float32Array(n);
    Y = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      X[i] = PAD + pts.x[i] * (W - 2 * PAD);
      Y[i] = PAD + (1 - pts.y[i]) * (H - 2 * PAD);
    }
    sortByLabel();
    grid = new Map();
    for (let i = 0; i < pts.x.length; i++) {
      const key = Math.floor(px(i) / CELL) + "," + Math.floor(py(i) / CELL);
      if (!grid.has(key)) grid.set(key, []);
      grid.get(key).push(i);
    }
  }

  function sortByLabel() {
    byLabel = Int32Array.from({ length: pts.x.length }, (_, i) => i).sort((a, b) => pts.label[a] - pts.label[b]);
  }

  function draw() {  // every point once, a colour at a time; flagged ones on top with a dark ring
    const t0 = performance.now();
    const n = pts.x.length, done = doneUris();
    ctx.clearRect(0, 0, W, H);
    let last = null;
    for (const i of byLabel) {  // one fillStyle change per class
      const c = color(pts.label[i]);
      if (c !== last) { ctx.fillStyle = c; last = c; }
      ctx.fillRect(X[i] - 1.5, Y[i] - 1.5, 3, 3);
    }
    ctx.lineWidth = 1.2;
    for (let i = 0; i < n; i++) {
      const f = pts.flag[i];
      if (!f || f === 2) continue;
      ctx.strokeStyle = done.has(pts.img[i]) ? "#1a7f37" : "#000";
      ctx.beginPath();
      if (f === 3) {  // rejected by the unknown detector: a cross
        ctx.moveTo(px(i) - 3, py(i) - 3); ctx.lineTo(px(i) + 3, py(i) + 3);
        ctx.moveTo(px(i) + 3, py(i) - 3); ctx.lineTo(px(i) - 3, py(i) + 3);
      } else ctx.arc(px(i), py(i), 3.5, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.fillStyle = "#000";
    for (const i of selected) ctx.fillRect(px(i) - 2.5, py(i) - 2.5, 5, 5);
    base = ctx.getImageData(0, 0, W, H);
    window.petalMapStats = { points: n, drawMs: performance.now() - t0 };
  }

  function doneUris() {
    const done = new Set();
    for (const c of state.cards) if (state.decisions[c.id] && c.img.length === 1) done.add(c.img[0]);
    return done;
  }

  function legend() {
    const items = state.classes.map((c, i) => el("span", {}, el("i", { style: `background:${color(i)}` }), `${i + 1} ${c}`));
    items.push(el("span", { textContent: "○ suspect · ✕ unknown · grey: unlabeled" }));
    $("legend").replaceChildren(...items);
    $("map-info").textContent = `${pts.x.length} images (${pts.method}); drag: box, shift+drag: lasso`;
  }

  function refresh() { if (pts) { draw(); showSelection(); } }

  function nearest(x, y) {
    let best = -1, bestD = 36;
    const cx = Math.floor(x / CELL), cy = Math.floor(y / CELL);
    for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
      for (const i of grid.get((cx + dx) + "," + (cy + dy)) || []) {
        const d = (px(i) - x) ** 2 + (py(i) - y) ** 2;
        if (d < bestD) { bestD = d; best = i; }
      }
    }
    return best;
  }

  function inside(poly, x, y) {  // ray casting
    let yes = false;
    for (let a = 0, b = poly.length - 1; a < poly.length; b = a++) {
      const [xa, ya] = poly[a], [xb, yb] = poly[b];
      if ((ya > y) !== (yb > y) && x < (xb - xa) * (y - ya) / (yb - ya) + xa) yes = !yes;
    }
    return yes;
  }

  function finish() {
    const n = pts.x.length;
    selected = new Set();
    if (drag.lasso) {
      const xs = drag.path.map((p) => p[0]), ys = drag.path.map((p) => p[1]);
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      for (let i = 0; i < n; i++) {
        const x = px(i), y = py(i);
        if (x >= x0 && x <= x1 && y >= y0 && y <= y1 && inside(drag.path, x, y)) selected.add(i);
      }
    } else {
      const [a, b] = [drag.path[0], drag.path[drag.path.length - 1]];
      const [x0, x1, y0, y1] = [Math.min(a[0], b[0]), Math.max(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[1], b[1])];
      for (let i = 0; i < n; i++) {
        const x = px(i), y = py(i);
        if (x >= x0 && x <= x1 && y >= y0 && y <= y1) selected.add(i);
      }
    }
    drag = null;
    refresh();
  }

  function showSelection() {
    const box = $("selection");
    box.replaceChildren();
    const labeled = [...selected].filter((i) => pts.label[i] >= 0);
    if (!selected.size) return;
    box.append(`${labeled.length} selected:`);
    state.classes.slice(0, 9).forEach((c, i) => {
      const b = el("button", { type: "button" }, el("kbd", { textContent: String(i + 1) }), c);
      b.addEventListener("click", () => apply("relabel", c));
      box.append(b);
    });
    const x = el("button", { type: "button" }, el("kbd", { textContent: "X" }), "exclude");
    x.addEventListener("click", () => apply("exclude", ""));
    box.append(x);
  }

  function apply(action, label) {
    const img = [...selected].filter((i) => pts.label[i] >= 0).map((i) => pts.img[i]);
    if (!img.length) return;
    const ids = new Set(img);
    send("select", { img, action, label }).then((p) => {
      if (!p) return;
      if (action === "relabel") {
        for (const i of selected) if (ids.has(pts.img[i])) pts.label[i] = state.classes.indexOf(label);
        sortByLabel();
      }
      setStatus(`${img.length} image(s) ${action === "relabel" ? "relabelled " + label : "excluded"}`);
      selected = new Set();
      reloadDecisions().then(refresh);
    });
  }

  function key(e) {
    if (/^[1-9]$/.test(e.key) && selected.size && state.classes[Number(e.key) - 1]) apply("relabel", state.classes[Number(e.key) - 1]);
    else if (e.key.toLowerCase() === "x" && selected.size) apply("exclude", "");
    else if (e.key === "Escape") { selected = new Set(); refresh(); }
    else return false;
    return true;
  }

  function at(e) {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * W / r.width, (e.clientY - r.top) * H / r.height];
  }

  canvas.addEventListener("mousedown", (e) => { drag = { lasso: e.shiftKey, path: [at(e)] }; tip.hidden = true; });
  canvas.addEventListener("mousemove", (e) => {
    const [x, y] = at(e);
    if (drag) {
      drag.path.push([x, y]);
      ctx.putImageData(base, 0, 0);  // the points are drawn once; a frame redraws only the outline
      ctx.strokeStyle = "#bf3989";
      ctx.beginPath();
      if (drag.lasso) { ctx.moveTo(...drag.path[0]); for (const p of drag.path) ctx.lineTo(...p); }
      else { const [a] = drag.path; ctx.rect(a[0], a[1], x - a[0], y - a[1]); }
      ctx.stroke();
      return;
    }
    const i = nearest(x, y);
    tip.hidden = i < 0;
    if (i < 0) return;
    tip.style.left = (x + 12) + "px";
    tip.style.top = (y + 12) + "px";
    const img = tip.querySelector("img");
    const src = `api/image/${pts.img[i]}?size=96`;
    if (img.getAttribute("src") !== src) img.src = src;
    tip.querySelector("div").textContent = (pts.label[i] >= 0 ? state.classes[pts.label[i]] : "unlabeled") +
      (pts.flag[i] === 1 ? " · suspect" : pts.flag[i] === 3 ? " · unknown" : "");
  });
  window.addEventListener("mouseup", () => { if (drag) finish(); });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });

  return { open, refresh, key, selected: () => selected };
})();

$("tab-cards").addEventListener("click", () => showView("cards"));
$("tab-map").addEventListener("click", () => showView("map"));
load().catch((e) => setStatus("cannot load the review: " + e.message, true));
