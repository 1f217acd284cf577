"""The review page's server: routes are thin, the work is in petal.reviewing.session.

It writes files, so it is locked down like a notebook server:
- it listens on loopback unless told otherwise (petal.reviewing.serve);
- a random token is in the printed URL; opening it sets an HttpOnly, SameSite=Strict cookie
  with the token, and every other route (data, images, decisions) needs that cookie or an
  X-Petal-Token header; without it: 403;
- a POST needs the X-Petal-Token header as well (a page of another site can make the browser
  send the cookie, but not a custom header without a CORS preflight, which is never granted)
  and, when the browser sends one, an Origin of this very server;
- the Host header must name this server (127.0.0.1, localhost, ::1 or the address it was
  given): a DNS-rebinding page cannot reach it under another name.
"""

from __future__ import annotations

import asyncio
import secrets
from importlib import resources
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from petal.errors import PetalError
from petal.report import jpeg_thumbnail
from petal.reviewing.workbench import Workbench

COOKIE, HEADER = "petal_review", "x-petal-token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATIC = {"review.js": "text/javascript", "review.css": "text/css"}
SHARED = {"cards.css": "text/css"}  # the served page's look (petal.webpage.page)
IMAGE_SIZES = (96, 480)  # map thumbnails, card images


class Decision(BaseModel):
    card: str
    action: str
    label: str = ""
    which: int | None = None


class Selection(BaseModel):
    img: list[int]
    action: str
    label: str = ""


def new_token() -> str:
    return secrets.token_urlsafe(24)


def create_app(wb: Workbench, token: str, host: str = "127.0.0.1") -> FastAPI:
    """The page and its API for one review; `host`: the address it listens on."""
    app = FastAPI(title="petal review", docs_url=None, redoc_url=None, openapi_url=None)
    hosts = {*LOOPBACK, host}

    @app.middleware("http")
    async def same_host(request: Request, call_next):  # noqa: ANN202 - Starlette's middleware signature
        name = urlsplit("//" + request.headers.get("host", "")).hostname or ""
        if name not in hosts:
            return JSONResponse({"error": f"host {name!r} is not this review server"}, status_code=403)
        return await call_next(request)

    @app.exception_handler(PetalError)
    async def user_error(request: Request, e: PetalError) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=400)

    def has_token(request: Request) -> bool:
        given = request.headers.get(HEADER) or request.cookies.get(COOKIE) or ""
        return secrets.compare_digest(given.encode(), token.encode())

    async def reader(request: Request) -> None:
        if not has_token(request):
            raise HTTPException(403, "no or wrong token: open the URL that `petal review` printed")

    async def writer(request: Request) -> None:
        header = request.headers.get(HEADER, "")
        if not secrets.compare_digest(header.encode(), token.encode()):
            raise HTTPException(403, f"a change needs the {HEADER} header with the review's token")
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, f"origin {origin} is not this review server")

    app.include_router(pages(token))
    app.include_router(data_api(wb), dependencies=[Depends(reader)])
    app.include_router(decision_api(wb), dependencies=[Depends(writer)])
    return app


def pages(token: str) -> APIRouter:
    router = APIRouter()
    page = resources.files("petal.reviewing").joinpath("static/review.html").read_text(encoding="utf-8")
    files = {name: (resources.files("petal.reviewing").joinpath(f"static/{name}").read_text(encoding="utf-8"), kind)
             for name, kind in STATIC.items()}
    files |= {name: (resources.files("petal.webpage").joinpath(f"page/{name}").read_text(encoding="utf-8"), kind)
              for name, kind in SHARED.items()}

    @router.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        given = request.query_params.get("token", "") or request.cookies.get(COOKIE, "")
        if not secrets.compare_digest(given.encode(), token.encode()):
            return HTMLResponse("<!doctype html><title>petal review</title><p>Open the URL with the token that "
                                "<code>petal review</code> printed.</p>", status_code=403)
        response = HTMLResponse(page.replace("{{TOKEN}}", token), headers={"Cache-Control": "no-store"})
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no file {name}")
        return Response(files[name][0], media_type=files[name][1])

    return router


def data_api(wb: Workbench) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.get("/cards")
    async def cards() -> dict:
        s = wb.session
        return {"run": wb.run.name, "cards": wb.card_list(), "decisions": s.decisions(), "progress": s.progress()}

    @router.get("/map")
    async def feature_map() -> dict:
        return await asyncio.to_thread(wb.map_points)

    @router.get("/image/{i}")
    def image(i: int, size: int = IMAGE_SIZES[1]) -> Response:  # sync: a thread of the pool reads the file
        if not 0 <= i < len(wb.images) or size not in IMAGE_SIZES:
            raise HTTPException(404, f"no image {i} at size {size}")
        data = jpeg_thumbnail(wb.images[i], size)
        if not data:
            raise HTTPException(404, f"image {i} cannot be read")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return router


def decision_api(wb: Workbench) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.post("/decide")
    def decide(d: Decision) -> dict:
        return wb.session.decide(d.card, d.action, d.label, d.which)

    @router.post("/select")
    def select(s: Selection) -> dict:
        bad = [i for i in s.img if not 0 <= i < len(wb.images)]
        if bad:
            raise PetalError(f"img: no image numbered {bad[0]}")
        return wb.session.select([wb.images[i] for i in s.img], s.action, s.label)

    @router.post("/undo")
    def undo() -> dict:
        return wb.session.undo()

    return router
