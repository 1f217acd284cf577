"""One self-contained HTML report per run (RUN/report.html) and per audit.

It opens from file:// with no network: the thumbnails (JPEG, THUMB px) and the plots are
embedded as data: URIs, the script is inline. For large datasets it caps what it embeds:
the MAX_CLASSES classes with the most errors in the matrix, at most CELL_CAP images behind
an off-diagonal cell (DIAGONAL_CAP behind a correct one) and CELL_BUDGET in all, and the
top TOP items of each list, so a 100k-image run still gives a report of a few MB.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from petal.audit import Audit
from petal.storage import atomic_write_text

THUMB, CELL_CAP, DIAGONAL_CAP, MAX_CLASSES, TOP = 96, 12, 4, 30, 40
CELL_BUDGET = 1200  # thumbnails behind all confusion cells together (about 3 KB each)

CSS = """body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}h1{font-size:1.4rem}h2{font-size:1.1rem;
margin-top:2rem}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}.cm td[data-cell]{cursor:pointer}.cm td.off{background:#fde2e2}
.cm td.diag{background:#e2f0e2}.thumbs{display:flex;flex-wrap:wrap;gap:.4rem}.thumbs figure{margin:0;width:110px;
font-size:11px;overflow-wrap:anywhere}.thumbs img{width:96px;height:96px;object-fit:cover;display:block}
.figures img{max-width:420px;margin-right:1rem}.muted{color:#666}"""

SCRIPT = """const data = document.getElementById('cells');
const cells = data ? JSON.parse(data.textContent) : {};
for (const td of document.querySelectorAll('td[data-cell]')) {
  td.addEventListener('click', () => {
    const out = document.getElementById('cell-images');
    out.replaceChildren();
    const head = document.getElementById('cell-title');
    head.textContent = td.dataset.title;
    for (const [src, caption] of cells[td.dataset.cell] || []) {
      const f = document.createElement('figure');
      const img = document.createElement('img');
      img.src = src; img.alt = caption;
      const c = document.createElement('figcaption');
      c.textContent = caption;  // captions are folder/file names: text, never HTML
      f.append(img, c); out.append(f);
    }
  });
}"""


def script_json(value: object) -> str:
    """JSON to put inside a page's <script> element. Every `<` (and `>`, `&`) is written as a
    \\u escape, which JSON.parse reads back as the same character: a file name such as
    `<!--<script>a.jpg` would otherwise put the HTML parser in the "double-escaped" script state
    and swallow the rest of the page (the audit section), and `</script>` would end the element."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def jpeg_thumbnail(uri: str, size: int = THUMB) -> bytes:
    """A JPEG of the image at most `size` px on a side; b"" if it cannot be read."""
    from PIL import Image

    from petal.images import open_image, to_rgb
    from petal.storage import read_bytes

    try:
        img = to_rgb(open_image(read_bytes(uri)))
        img.thumbnail((size, size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70 if size <= THUMB else 85)
    except Exception:  # noqa: BLE001 - a thumbnail that fails leaves a blank, never a broken page
        return b""
    return buf.getvalue()


def thumbnail(uri: str) -> str:
    """A small JPEG of the image as a data: URI; an empty string if it cannot be read."""
    data = jpeg_thumbnail(uri)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii") if data else ""


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figures(items: list[tuple[str, str]]) -> str:
    """[(uri, caption)] -> a row of thumbnails."""
    if not items:
        return '<p class="muted">none</p>'
    cells = "".join(f'<figure><img src="{thumbnail(u)}" alt=""><figcaption>{html.escape(c)}</figcaption></figure>'
                    for u, c in items)
    return f'<div class="thumbs">{cells}</div>'


def short_name(uri: str) -> str:
    """A caption for an image: its folder and file name (roses/1.jpg), as names repeat across classes."""
    path = Path(uri)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def metrics_section(metrics: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
                   f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>" if m["support"] else
                   f'<tr><td>{html.escape(c)}</td><td colspan="3" class="muted">no eval image</td><td>0</td></tr>'
                   for c, m in metrics["per_class"].items())
    return (f'<h2>Metrics</h2><p>accuracy <b id="accuracy">{metrics["accuracy"]:.4f}</b> &middot; top-5 '
            f'{metrics["top5_accuracy"]:.4f} &middot; eval images <b id="num-eval">{metrics["num_eval"]}</b></p>'
            f"{trust_lines(metrics)}"
            "<table><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>"
            f"{rows}</table>")


def trust_lines(metrics: dict) -> str:
    """Calibration, the share kept as known, images of no class rejected, and the test split, in words."""
    lines = []
    if metrics.get("ece") is not None:
        before = (f" (before calibration {metrics['ece_uncalibrated']:.3f})"
                  if metrics.get("ece_uncalibrated") is not None else "")
        lines.append(f"calibration error (ECE) <b>{metrics['ece']:.3f}</b>{before}")
    if "ece_adaptive" in metrics:
        lo, hi = metrics["ece_adaptive_interval"]
        lines.append(f'adaptive calibration error <b id="ece-adaptive">{metrics["ece_adaptive"]:.3f}</b> (95% interval '
                     f"{lo:.3f} to {hi:.3f}; before calibration {metrics['ece_adaptive_uncalibrated']:.3f})")
    u = metrics.get("unknown") or {}
    kept = u.get("kept", u.get("kept_eval"))
    if kept is not None and u.get("accuracy_kept") is not None:
        lines.append(f'kept as known <b id="kept">{kept:.1%}</b>, accuracy on those {u["accuracy_kept"]:.4f}')
    d = metrics.get("unknown_data")
    if d:
        lines.append(f'images of no class rejected <b id="rejected">{d["rejected_unknown"]:.1%}</b> '
                     f'(AUROC {d["auroc"]:.3f}, {d["unknown_images"]} images)')
    t = metrics.get("test")
    if t:
        lines.append(f'test split: accuracy <b id="test-accuracy">{t["accuracy"]:.4f}</b>, top-5 '
                     f'{t["top5_accuracy"]:.4f} ({t["num_eval"]} images, evaluated on their own)')
    return "".join(f"<p>{line}</p>" for line in lines)


def confusion_section(classes: list[str], uris: list[str], y: np.ndarray, probs: np.ndarray) -> str:
    """The confusion matrix; a click on a cell shows (up to CELL_CAP of) the images behind it."""
    pred = probs.argmax(1)
    c = len(classes)
    cm = np.zeros((c, c), int)
    np.add.at(cm, (y, pred), 1)
    errors = cm.sum(1) - np.diag(cm) + cm.sum(0) - np.diag(cm)
    shown = sorted(np.argsort(-errors)[:MAX_CLASSES].tolist())
    cells, body, budget = {}, [], CELL_BUDGET
    for i in shown:
        row = [f"<td>{html.escape(classes[i])}</td>"]
        for j in shown:
            members = np.flatnonzero((y == i) & (pred == j))[:min(DIAGONAL_CAP if i == j else CELL_CAP, budget)]
            budget -= len(members)
            cells[f"{i},{j}"] = [(thumbnail(uris[k]), f"{short_name(uris[k])} ({probs[k, j]:.2f})") for k in members]
            title = html.escape(f"true {classes[i]}, predicted {classes[j]}: {cm[i, j]} image(s)", quote=True)
            kind = "diag" if i == j else ("off" if cm[i, j] else "")
            row.append(f'<td class="{kind}" data-cell="{i},{j}" data-title="{title}">{cm[i, j]}</td>')
        body.append("<tr>" + "".join(row) + "</tr>")
    head = "".join(f"<th>{html.escape(classes[j])}</th>" for j in shown)
    note = f" ({len(shown)} of {c} classes: those with the most errors)" if len(shown) < c else ""
    data = script_json(cells)
    return (f"<h2>Confusion matrix{note}</h2><p class=muted>rows: true class, columns: predicted; "
            f'click a cell for its images</p><table class="cm"><tr><th>true \\ predicted</th>{head}</tr>'
            f'{"".join(body)}</table><h3 id="cell-title"></h3><div class="thumbs" id="cell-images"></div>'
            f'<script type="application/json" id="cells">{data}</script>')


def errors_section(classes: list[str], uris: list[str], y: np.ndarray, probs: np.ndarray) -> str:
    """Top losses and the most confused pairs."""
    pred = probs.argmax(1)
    own = probs[np.arange(len(y)), y]
    worst = [i for i in np.argsort(own)[:TOP] if pred[i] != y[i]]
    losses = figures([(uris[i], f"{short_name(uris[i])}: {classes[y[i]]} -> {classes[pred[i]]} "
                                f"{probs[i, pred[i]]:.2f}") for i in worst])
    pairs = {}
    for i in np.flatnonzero(pred != y):
        pairs[(y[i], pred[i])] = pairs.get((y[i], pred[i]), 0) + 1
    top_pairs = sorted(pairs.items(), key=lambda kv: -kv[1])[:10]
    rows = "".join(f"<tr><td>{html.escape(classes[a])} &rarr; {html.escape(classes[b])}</td><td>{n}</td></tr>"
                   for (a, b), n in top_pairs)
    table = (f"<table><tr><th>true &rarr; predicted</th><th>images</th></tr>{rows}</table>" if rows
             else '<p class="muted">none</p>')
    return f"<h2>Top losses</h2>{losses}<h2>Most confused pairs</h2>{table}"


def audit_section(a: Audit) -> str:
    s = a.summary()
    advice = "".join(f"<p><b>advice:</b> {html.escape(x)}</p>" for x in a.advice)
    suspects = figures([(x.uri, f"{short_name(x.uri)}: {x.label}" + (f" -> {x.suggested}" if x.suggested else "")
                         + f" ({x.reason} {x.score:.2f})") for x in a.suspects[:TOP]])
    dups = [d for d in a.duplicates if d.crosses][:TOP // 2] or a.duplicates[:TOP // 2]
    pairs = figures([(u, f"{short_name(u)} ({d.kind} {d.similarity:.3f}{', ' + d.crosses if d.crosses else ''})")
                     for d in dups for u in (d.uri_a, d.uri_b)])
    return (f'<h2>Audit</h2><p id="audit-line">{html.escape(a.line())}</p>{advice}'
            f'<h3>Most suspicious ({s["label_suspects"]} likely label errors, {s["outliers"]} outliers)</h3>'
            f"{suspects}<h3>Duplicates (pairs)</h3>{pairs}")


MAP_THUMBS, MAP_THUMB = 300, 64  # thumbnails embedded in the static map: suspects first, then a sample
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
MAP_SCRIPT = """(() => {
const d = JSON.parse(document.getElementById('map-data').textContent);
const c = document.getElementById('feature-map'), g = c.getContext('2d'), tip = document.getElementById('map-tip');
const W = c.width, H = c.height, P = 10;
const X = d.x.map(v => P + v * (W - 2 * P)), Y = d.y.map(v => P + (1 - v) * (H - 2 * P));
for (let i = 0; i < X.length; i++) {
  g.fillStyle = d.colors[d.label[i]] || '#999';
  g.fillRect(X[i] - 1.5, Y[i] - 1.5, 3, 3);
}
g.strokeStyle = '#000';
for (let i = 0; i < X.length; i++) if (d.flag[i]) { g.beginPath(); g.arc(X[i], Y[i], 3.5, 0, 7); g.stroke(); }
c.addEventListener('mousemove', (e) => {
  const r = c.getBoundingClientRect(), x = (e.clientX - r.left) * W / r.width, y = (e.clientY - r.top) * H / r.height;
  let best = -1, bd = 64;
  for (let i = 0; i < X.length; i++) { const q = (X[i] - x) ** 2 + (Y[i] - y) ** 2; if (q < bd) { bd = q; best = i; } }
  tip.hidden = best < 0;
  if (best < 0) return;
  tip.style.left = (e.pageX + 12) + 'px'; tip.style.top = (e.pageY + 12) + 'px';
  const img = tip.querySelector('img'), t = d.thumbs[best];
  img.hidden = !t; if (t) img.src = t;
  tip.querySelector('span').textContent =
    d.names[best] + ' (' + d.classes[d.label[best]] + (d.flag[best] ? ', suspect' : '') + ')';
});
c.addEventListener('mouseleave', () => { tip.hidden = true; });
})();"""


def map_section(xy: np.ndarray, labels: list[int], classes: list[str], flagged: list[bool], uris: list[str],
                method: str) -> str:
    """The feature map, static: every image a dot coloured by its label, suspects ringed, a
    thumbnail on hover (embedded for the suspects and a sample: MAP_THUMBS in all)."""
    order = [i for i in range(len(uris)) if flagged[i]] + [i for i in range(len(uris)) if not flagged[i]]
    step = max(1, len(order) // MAP_THUMBS)
    picked = (order[:MAP_THUMBS // 2] + order[MAP_THUMBS // 2::step])[:MAP_THUMBS]
    thumbs = {}
    for i in picked:
        if data := jpeg_thumbnail(uris[i], MAP_THUMB):
            thumbs[i] = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    data = {"x": np.round(xy[:, 0], 4).tolist(), "y": np.round(xy[:, 1], 4).tolist(), "label": labels,
            "flag": [int(f) for f in flagged], "names": [Path(u).name for u in uris], "classes": classes,
            "colors": [PALETTE[i % len(PALETTE)] for i in range(len(classes))], "thumbs": thumbs}
    legend = " ".join(f'<span style="color:{PALETTE[i % len(PALETTE)]}">&#9679;</span> {html.escape(c)}'
                      for i, c in enumerate(classes))
    return (f'<h2>Feature map ({html.escape(method)})</h2><p class="muted">{legend} &middot; ringed: audit suspects; '
            f'hover for the image (petal review RUN: select and relabel on it)</p>'
            '<canvas id="feature-map" width="800" height="560" style="border:1px solid #ddd"></canvas>'
            '<div id="map-tip" hidden style="position:absolute;background:#fff;border:1px solid #ccc;padding:2px;'
            'font-size:11px;pointer-events:none"><img alt="" style="display:block"><span></span></div>'
            f'<script type="application/json" id="map-data">{script_json(data)}</script>'
            f"<script>{MAP_SCRIPT}</script>")


def insert_section(path: Path, name: str, section: str, at_top: bool = False) -> None:
    """Put `section` into an existing report (after its title, or at its end), replacing the
    section of that `name` an earlier call put there."""
    text = path.read_text("utf-8")
    start, end = f"<!--petal:{name}-->", f"<!--/petal:{name}-->"
    if start in text:
        text = text[:text.index(start)] + text[text.index(end) + len(end):]
    at = text.find("</h1>") + len("</h1>") if at_top else text.rfind("<script>")
    atomic_write_text(path, text[:at] + start + section + end + text[at:])


def write_html_report(path: Path, title: str, *, metrics: dict | None = None, classes: list[str] | None = None,
                      eval_set: tuple[list[str], np.ndarray, np.ndarray] | None = None, audit: Audit | None = None,
                      plots: list[Path] = ()) -> Path:
    """report.html at `path`: metrics and the per-class table, the confusion matrix with its
    images, top losses, the plots that exist, and the audit's findings."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if metrics and metrics.get("accuracy") is not None:
        parts.append(metrics_section(metrics))
    if eval_set is not None and classes and len(eval_set[1]):
        parts += [confusion_section(classes, *eval_set), errors_section(classes, *eval_set)]
    existing = [p for p in plots if p.exists()]
    if existing:
        imgs = "".join(f'<img src="{png_uri(p)}" alt="{html.escape(p.stem)}">' for p in existing)
        parts.append(f'<h2>Plots</h2><div class="figures">{imgs}</div>')
    if audit is not None:
        parts.append(audit_section(audit))
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
           f"<style>{CSS}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>")
    atomic_write_text(path, doc)
    return path
