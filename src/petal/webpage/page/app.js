// The page: petal.json and model.onnx from this folder, onnxruntime-web's WebAssembly build from
// ort/, every image classified here in the browser; nothing is uploaded or fetched from elsewhere.
"use strict";

const TOP_K = 5;
const $ = (id) => document.getElementById(id);
const statusLine = $("status"), results = $("results");
const state = { info: null, session: null, queue: Promise.resolve(), done: 0, failed: 0 };
window.petalTimes = {};  // ms since navigation start: "ready" (model loaded), "first" (first result)

function setStatus(text, bad = false) {
  statusLine.textContent = text;
  statusLine.className = bad ? "bad" : "";
}

async function load() {
  if (location.protocol === "file:") {
    throw new Error("browsers do not let a page opened as a file load its model. Serve this folder, e.g. " +
                    "`python3 -m http.server -d FOLDER 8000`, and open http://localhost:8000/");
  }
  const r = await fetch("petal.json");
  if (!r.ok) throw new Error("petal.json: HTTP " + r.status);
  state.info = await r.json();
  $("title").textContent = state.info.name || "petal";
  document.title = (state.info.name || "petal") + " · in the browser";
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;  // import() needs a full URL
  // threads need a cross-origin-isolated page (COOP/COEP headers); a plain static server gives one
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  state.session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  window.petalTimes.ready = performance.now();
  document.body.dataset.ready = "1";
  setStatus("Ready: choose or drop images" + (navigator.mediaDevices ? ", or use the camera." : "."));
}

// A File/Blob -> {label, score, top: [[label, score]...], unknown, ood_score}.
async function classify(blob) {
  const info = state.info, S = info.preprocess.input_size;
  const pixels = await PetalPreprocess.fromBlob(blob, info.preprocess);
  const feeds = { images: new ort.Tensor("uint8", pixels, [1, S, S, 3]) };
  const out = await state.session.run(feeds);
  const probs = Array.from(out.probabilities.data);
  const order = probs.map((p, i) => [info.labels[i], p]).sort((a, b) => b[1] - a[1]);
  return {
    label: order[0][0], score: order[0][1], top: order.slice(0, TOP_K),
    unknown: out.unknown ? Boolean(out.unknown.data[0]) : false,
    ood_score: out.ood_score ? out.ood_score.data[0] : null,
  };
}

// One card per image: the picture, its name, then bars (or an error), newest first.
function makeCard(blob, name) {
  const card = document.createElement("div");
  card.className = "card";
  const img = document.createElement("img");
  img.alt = name;
  img.src = URL.createObjectURL(blob);
  img.onload = img.onerror = () => URL.revokeObjectURL(img.src);
  const body = document.createElement("div");
  body.className = "body";
  const title = document.createElement("div");
  title.className = "name";
  title.textContent = name;
  const out = document.createElement("div");
  out.className = "pending";
  out.textContent = "predicting…";
  body.append(title, out);
  card.append(img, body);
  return { card, out };
}

function showPrediction(card, out, p) {
  out.replaceChildren();
  if (p.error) {
    out.className = "error";
    out.textContent = p.error;
    return;
  }
  out.className = "bars";
  card.dataset.label = p.label;  // the nearest class, as Prediction.label in Python
  card.dataset.unknown = p.unknown ? "1" : "0";
  if (p.unknown) {  // like none of the training images: the bars are only the nearest classes
    const note = document.createElement("div");
    note.className = "unknown";
    note.textContent = "unknown: not one of " + state.info.labels.join(", ") + " (nearest: " + p.label + ")";
    out.append(note);
  }
  for (const [label, score] of p.top) {
    const row = document.createElement("div");
    row.className = "bar";
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * score).toFixed(1) + "%";
    const text = document.createElement("span");
    text.className = "label";
    text.textContent = label;  // textContent: labels and file names are never parsed as HTML
    track.append(fill, text);
    const num = document.createElement("span");
    num.className = "score";
    num.textContent = (100 * score).toFixed(1) + "%";
    row.append(track, num);
    out.append(row);
  }
}

// Classify blobs one at a time, in order; cards appear at once and fill in as results come.
function predict(items) {
  const anchor = results.firstChild;
  const cards = items.map(([blob, name]) => {
    const c = makeCard(blob, name);
    results.insertBefore(c.card, anchor);
    return c;
  });
  setStatus("Predicting " + items.length + " image(s)…");
  state.queue = state.queue.then(async () => {
    for (const [i, [blob]] of items.entries()) {
      let p;
      try {
        p = await classify(blob);
      } catch (e) {
        p = { error: e.message };
        state.failed++;
      }
      showPrediction(cards[i].card, cards[i].out, p);
      state.done++;
      window.petalTimes.first = window.petalTimes.first || performance.now();
    }
    setStatus("Done: " + (state.done - state.failed) + " predicted, " + state.failed + " failed.");
  });
}

async function startCamera() {
  const video = $("video");
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (e) {
    setStatus("Camera: " + e.message, true);
    return;
  }
  $("camera-view").hidden = false;
}

function snap() {
  const video = $("video"), w = video.videoWidth, h = video.videoHeight;
  if (!w) return;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => whenReady([[blob, "camera " + new Date().toLocaleTimeString()]]), "image/png");
}

const drop = $("drop"), picker = $("files");
const ready = load().catch((e) => setStatus("Cannot load the model: " + e.message, true));
const whenReady = (items) => ready.then(() => state.session && predict(items));
drop.addEventListener("click", () => picker.click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") picker.click(); });
picker.addEventListener("change", () => {
  whenReady(Array.from(picker.files, (f) => [f, f.name]));
  picker.value = "";
});
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  whenReady(Array.from(e.dataTransfer.files, (f) => [f, f.name]));
});
if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {  // secure contexts only
  $("camera").hidden = false;
  $("camera").addEventListener("click", startCamera);
  $("snap").addEventListener("click", snap);
}
