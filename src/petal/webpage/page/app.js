// The page: petal.json and model.onnx from this folder, onnxruntime-web's WebAssembly build from
// ort/, every image classified here in the browser; nothing is uploaded or fetched from elsewhere.
"use strict";

const TOP_K = 5;
const { results, setStatus, makeCard, showPrediction, onFiles } = PetalCards;
const state = { info: null, session: null, queue: Promise.resolve(), done: 0, failed: 0 };
window.petalTimes = {};  // ms since navigation start: "ready" (model loaded), "first" (first answer shown)

async function load() {
  if (location.protocol === "file:") {
    throw new Error("browsers do not let a page opened as a file load its model. Serve this folder, e.g. " +
                    "`python3 -m http.server -d FOLDER 8000`, and open http://localhost:8000/");
  }
  const r = await fetch("petal.json");
  if (!r.ok) throw new Error("petal.json: HTTP " + r.status);
  state.info = await r.json();
  document.getElementById("title").textContent = state.info.name || "petal";
  document.title = (state.info.name || "petal") + " · in the browser";
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;  // import() needs a full URL
  // threads need a cross-origin-isolated page (COOP/COEP headers); a plain static server gives one
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  state.session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  window.petalTimes.ready = performance.now();
  document.body.dataset.ready = "1";
  setStatus("Ready: choose or drop images" + (navigator.mediaDevices ? ", or use the camera." : "."));
}

// A File/Blob -> {label (the answer: "unknown" for an image like none of the classes), score (0 when
// unknown), nearest (the top-1 class), top: [{label, score}], unknown, ood_score},
// as petal.predictions.Prediction in Python.
async function classify(blob) {
  const info = state.info, S = info.preprocess.input_size;
  const pixels = await PetalPreprocess.fromBlob(blob, info.preprocess);
  const out = await state.session.run({ images: new ort.Tensor("uint8", pixels, [1, S, S, 3]) });
  const top = Array.from(out.probabilities.data, (score, i) => ({ label: info.labels[i], score }))
    .sort((a, b) => b.score - a.score);
  const unknown = out.unknown ? Boolean(out.unknown.data[0]) : false;  // bundles without the detector: never
  return {
    label: unknown ? "unknown" : top[0].label, score: unknown ? 0 : top[0].score, nearest: top[0].label,
    top: top.slice(0, TOP_K), unknown, ood_score: out.ood_score ? out.ood_score.data[0] : null,
  };
}

// Classify [blob, name] items one at a time, in order; their cards appear at once and fill in.
function predict(items) {
  const anchor = results.firstChild;
  const slots = items.map(([blob, name]) => makeCard(blob, name, anchor));
  setStatus("Predicting " + items.length + " image(s)…");
  state.queue = state.queue.then(async () => {
    for (const [i, [blob]] of items.entries()) {
      let p;
      try {
        p = await classify(blob);
        Object.assign(slots[i].closest(".card").dataset, { label: p.label, unknown: p.unknown ? "1" : "0" });
      } catch (e) {
        p = { error: e.message };
        state.failed++;
      }
      showPrediction(slots[i], p, state.info.labels);
      state.done++;
      window.petalTimes.first = window.petalTimes.first || performance.now();
    }
    setStatus("Done: " + (state.done - state.failed) + " predicted, " + state.failed + " failed.");
  });
}

const ready = load().catch((e) => setStatus("Cannot load the model: " + e.message, true));
const whenReady = (items) => ready.then(() => state.session && predict(items));
onFiles((files) => whenReady(files.map((f) => [f, f.name])));

// The camera, where the browser allows it (secure contexts: https, or http on localhost).
async function startCamera() {
  const video = document.getElementById("video");
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (e) {
    setStatus("Camera: " + e.message, true);
    return;
  }
  document.getElementById("camera-view").hidden = false;
}

function snap() {  // the current frame, as a PNG, through the same path as a chosen file
  const video = document.getElementById("video"), w = video.videoWidth, h = video.videoHeight;
  if (!w) return;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => whenReady([[blob, "camera " + new Date().toLocaleTimeString()]]), "image/png");
}

if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
  const button = document.getElementById("camera");
  button.hidden = false;
  button.addEventListener("click", startCamera);
  document.getElementById("snap").addEventListener("click", snap);
}
