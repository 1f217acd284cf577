"""A client for `petal serve` (or any server speaking its API): `petal predict --url URL`.

    m = RemoteModel("http://localhost:8080/v1/models/flowers:predict")
    for p in m.iter_predict(["rose.jpg", "tulip.png"], top_k=3):
        print(p.uri, p.label, p.score)         # the same Prediction as a local model gives

Images go in row-format requests of up to `batch_size` images (and about
`max_request_bytes`). A file that cannot be read, or an image the server refuses,
comes back as Prediction(uri, error=...); a server that cannot be reached or
refuses the API key raises PetalError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from petal.errors import PetalError
from petal.predictions import Prediction, prediction
from petal.serve.config import API_KEY_ENV
from petal.serve.protocol import encode_request
from petal.storage import read_bytes

_MODEL_URL = re.compile(r"^(?P<root>.*?)/v1/models/(?P<name>[^/:]+)(?::predict)?/?$")


class RemoteModel:
    def __init__(self, url: str, api_key: str | None = None, batch_size: int = 16,
                 max_request_bytes: int = 8 * 1024 * 1024, timeout: float = 120.0,
                 reject_unknown: bool = True) -> None:
        try:
            import httpx
        except ImportError:
            raise PetalError("predict --url: needs httpx; install it with: "
                             "pip install 'petal[serve]'") from None
        key = api_key or os.environ.get(API_KEY_ENV)
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {})
        self.batch_size = batch_size
        self.max_request_bytes = max_request_bytes
        self.root, self.name = self._resolve(url.strip())
        self.predict_url = f"{self.root}/v1/models/{self.name}:predict" + ("" if reject_unknown else "?unknown=false")
        self._labels: list[str] | None = None

    def _resolve(self, url: str) -> tuple[str, str]:
        """URL of a model (…/v1/models/NAME[:predict]) or of a server with one model -> (root, name).
        Without a scheme (127.0.0.1:8080) it is http."""
        if "://" not in url:
            url = "http://" + url
        if m := _MODEL_URL.match(url):
            return m["root"], m["name"]
        root = url.rstrip("/")
        names = [m["name"] for m in self._get(f"{root}/v1/models")["models"]]
        if len(names) != 1:
            raise PetalError(f"url: {url} serves {len(names)} models ({', '.join(names)}); expected a model "
                             f"URL such as {root}/v1/models/{names[0] if names else 'NAME'}:predict")
        return root, names[0]

    @property
    def labels(self) -> list[str]:
        """Class names in id order, from the server's metadata."""
        if self._labels is None:
            self._labels = self._get(f"{self.root}/v1/models/{self.name}/metadata")["metadata"]["labels"]
        return self._labels

    def iter_predict(self, uris: Iterable[str], top_k: int = 5) -> Iterator[Prediction]:
        """Predictions in input order."""
        labels = self.labels
        chunk: list[tuple[str, bytes]] = []
        size = 0
        for uri in uris:
            try:
                data = read_bytes(uri)
            except PetalError as e:
                yield from self._flush(chunk, labels, top_k)
                chunk, size = [], 0
                yield Prediction(uri, error=str(e))
                continue
            if chunk and (len(chunk) >= self.batch_size or size + len(data) > self.max_request_bytes):
                yield from self._flush(chunk, labels, top_k)
                chunk, size = [], 0
            chunk.append((uri, data))
            size += len(data)
        yield from self._flush(chunk, labels, top_k)

    def predict(self, uris: Iterable[str], top_k: int = 5) -> list[Prediction]:
        return list(self.iter_predict(uris, top_k))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP --

    def _flush(self, chunk: list[tuple[str, bytes]], labels: list[str], top_k: int) -> Iterator[Prediction]:
        if not chunk:
            return
        status, doc = self._post(chunk)
        if status == 413 and len(chunk) > 1:  # the server's limits are smaller: split
            half = len(chunk) // 2
            yield from self._flush(chunk[:half], labels, top_k)
            yield from self._flush(chunk[half:], labels, top_k)
            return
        if status != 200:
            reason = f"server answered {status}: {doc.get('error', '')}"
            yield from (Prediction(uri, error=reason) for uri, _ in chunk)
            return
        rows = doc.get("predictions")
        if not isinstance(rows, list) or len(rows) != len(chunk):
            raise PetalError(f"server: expected {len(chunk)} predictions, got {str(doc)[:200]}")
        for (uri, _), row in zip(chunk, rows, strict=True):
            yield prediction_from_row(uri, row, labels, top_k)

    def _post(self, chunk: list[tuple[str, bytes]]) -> tuple[int, dict]:
        # keys are positions in this request, so the client never depends on echoing URIs
        body = encode_request((str(i), data) for i, (_, data) in enumerate(chunk))
        return self._send("POST", self.predict_url, json=body)

    def _get(self, url: str) -> dict:
        status, doc = self._send("GET", url)
        if status != 200:
            raise PetalError(f"server: GET {url} answered {status}: {doc.get('error', '')}")
        return doc

    def _send(self, method: str, url: str, **kw: Any) -> tuple[int, dict]:
        import httpx

        try:
            r = self.http.request(method, url, **kw)
        except httpx.HTTPError as e:
            raise PetalError(f"server: cannot reach {url}: {e}") from None
        try:
            doc = r.json()
        except ValueError:
            doc = {"error": r.text[:200]}
        if r.status_code in (401, 403, 404):  # wrong key or URL: no point going on
            raise PetalError(f"server: {method} {url} answered {r.status_code}: {doc.get('error', '')}"
                             + (f" (set {API_KEY_ENV})" if r.status_code == 401 else ""))
        return r.status_code, doc if isinstance(doc, dict) else {"error": str(doc)[:200]}


def prediction_from_row(uri: str, row: object, labels: list[str], top_k: int) -> Prediction:
    """A response row -> Prediction, as a local `Model.prediction` would build it."""
    if not isinstance(row, dict):
        return Prediction(uri, error=f"server: expected a prediction object, got {str(row)[:100]}")
    if "error" in row:
        return Prediction(uri, error=str(row["error"]))
    probs = np.asarray(row["scores"], dtype=np.float32)
    if len(probs) != len(labels):
        return Prediction(uri, error=f"server: expected {len(labels)} scores, got {len(probs)}")
    p = prediction(labels, uri, probs, top_k)
    p.unknown, p.ood_score = bool(row.get("unknown", False)), row.get("ood_score")
    return p
