"""`petal serve`: an exported bundle behind an HTTP API in the Cloud ML / TF Serving format.

    POST /v1/models/NAME:predict   {"instances": [{"image_bytes": {"b64": "..."}, "key": "1"}]}
    POST /v1/models/NAME:upload    multipart image files -> top-k labels (for humans and curl)
    GET  /                         a web page: drop images, see their top-5 labels

Modules: `config` (options, no heavy imports), `protocol` (the JSON format, stdlib
only, shared with `petal.client`), `batcher` (dynamic micro-batching), `service`
(models + decoding + batching, no HTTP), `limits` (body size, timeouts, auth),
`metrics` (Prometheus), `guards` (Host, cross-site and content-type checks), `app` (FastAPI
routes), `server` (uvicorn), `v2` (the Open Inference Protocol, its schema in pydantic).
Only `app`, `limits`, `guards`, `metrics` and `server` import FastAPI / uvicorn / prometheus.
"""
