// The parts petal's two pages share (petal serve's and the exported web page's): the status
// line, the drop zone and file picker, and one result card per image.
"use strict";

const PetalCards = (() => {
  const statusLine = document.getElementById("status"), results = document.getElementById("results");

  function setStatus(text, bad = false) {
    statusLine.textContent = text;
    statusLine.className = bad ? "bad" : "";
  }

  // A card for `blob` titled `name`, placed before `anchor` (the first card of earlier batches:
  // newest batch first, in file order). Returns the element that showPrediction fills.
  function makeCard(blob, name, anchor) {
    const card = document.createElement("div");
    card.className = "card";
    const img = document.createElement("img");
    img.alt = name;
    img.src = URL.createObjectURL(blob);
    img.onload = () => URL.revokeObjectURL(img.src);
    img.onerror = () => { URL.revokeObjectURL(img.src); img.style.visibility = "hidden"; };
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
    results.insertBefore(card, anchor);
    return out;
  }

  // p: {error} or {label, nearest, unknown, top: [{label, score}]}; `labels`: the model's classes.
  function showPrediction(out, p, labels = []) {
    out.replaceChildren();
    if (p.error) {
      out.className = "error";
      out.textContent = p.error;
      return;
    }
    out.className = "bars";
    if (p.unknown) {  // like none of the training images: the bars are only the nearest classes
      const note = document.createElement("div");
      note.className = "unknown";
      note.textContent = "not one of: " + labels.join(", ") + " (nearest: " + (p.nearest || p.label) + ")";
      out.append(note);
    }
    for (const { label, score } of p.top) {
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

  // Chosen (click or keyboard on #drop) and dropped files go to onFiles(Array of File).
  function onFiles(handler) {
    const drop = document.getElementById("drop"), picker = document.getElementById("files");
    drop.addEventListener("click", () => picker.click());
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") picker.click(); });
    picker.addEventListener("change", () => { handler(Array.from(picker.files)); picker.value = ""; });
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
    }
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      handler(Array.from(e.dataTransfer.files));
    });
  }

  return { results, setStatus, makeCard, showPrediction, onFiles };
})();
