"""The HTTP side: A1111's ``/sdapi/v1`` routes, OpenAI's ``/v1/images`` routes and the web
page, on FastAPI, over a ``Service``.

Every failure is one line: ``{"error": kind, "detail": message}`` on A1111's routes,
OpenAI's ``{"error": {"message", "type"}}`` on ``/v1``; 400 for a body that is not JSON,
401 without the credentials, 404 for an unknown route or name, 413 for a body over the
limit, 422 for a value the request cannot take, 503 when the queue is full. Nothing is
queued, loaded or written for a request that fails its checks.
"""
import asyncio
import base64
import binascii
import json
import logging
import secrets
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ldm.errors import InputError, LdmError, ResourceError, UsageError, WrongType
from ldm.server import a1111, openai
from ldm.server.folders import NotFound
from ldm.server.service import TooBusy, hash_entry
from ldm.server.worker import Stopped

log = logging.getLogger(__name__)


class BadBody(UsageError):
    """A body that is not what the route reads (400)."""


class _TooLarge(BadBody):
    """A body over the server's limit (413)."""


def status_of(e):
    if isinstance(e, _TooLarge):
        return 413
    if isinstance(e, BadBody):
        return 400
    if isinstance(e, NotFound):
        return 404
    if isinstance(e, TooBusy):
        return 503
    if isinstance(e, (UsageError, WrongType, InputError)):
        return 422
    if isinstance(e, ResourceError):
        return 507
    if isinstance(e, Stopped):
        return 499
    return 500


def create_app(service, auth=None):
    """The ASGI app. ``auth``: {user: password} for HTTP basic auth on every route (the
    page too); OpenAI clients may send "user:password" as their API key."""
    app = FastAPI(title="latent-diffusion-txt2img server", version="1",
                  docs_url="/docs", redoc_url=None)
    app.state.service = service
    limits = service.limits

    def fail(request, e):
        status = status_of(e)
        message = str(e).split("\n")[0] or type(e).__name__
        if status == 500 and not isinstance(e, LdmError):
            log.error("%s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
            message = f"internal error ({type(e).__name__}): {message}"
        if request.url.path.startswith("/v1/"):
            status = 400 if status == 422 else status   # OpenAI's code for a bad value
            return JSONResponse(openai.error(message, status), status)
        return JSONResponse({"error": type(e).__name__, "detail": message}, status)

    app.add_middleware(Guard, auth=auth, limit=limits.max_body, fail=fail)

    @app.exception_handler(LdmError)
    async def ldm_error(request, e):
        return fail(request, e)

    @app.exception_handler(Exception)
    async def internal_error(request, e):   # logged with its traceback; the client gets a line
        return fail(request, e)

    @app.exception_handler(404)
    async def not_found(request, e):
        return fail(request, NotFound(f"no route {request.method} {request.url.path}"))

    @app.exception_handler(405)
    async def not_allowed(request, e):
        return fail(request, BadBody(f"{request.method} is not allowed on {request.url.path}"))

    # -- the page ----------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("ldm.server").joinpath("static/index.html")
                            .read_text(encoding="utf-8"))

    # -- A1111: generating ---------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await _generate(request, "txt2img", a1111.TXT2IMG_DEFAULTS)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await _generate(request, "img2img", a1111.IMG2IMG_DEFAULTS)

    async def _generate(request, task, defaults):
        body = await _json(request)
        gen, settings, job_id = a1111.read(body, service, task)
        job = service.submit(lambda engine, job: service.run(gen, engine, job), settings,
                             gen.kind, job_id, gen.n_iter)
        result = await _wait(request, job)
        return a1111.response(gen, result, body, service, defaults)

    async def _wait(request, job):
        """Until the job ends; a client that goes away drops its job (queued) or stops it
        (running)."""
        ticks = 0
        while not job.done.is_set():
            await asyncio.sleep(0.02)
            ticks += 1
            if ticks % 10 == 0 and await request.is_disconnected():
                service.queue.cancel(job)
                log.info("job %s dropped: its client went away", job.id)
                await asyncio.get_running_loop().run_in_executor(None, job.done.wait)
                break
        return service.outcome(job)

    # -- A1111: progress and control -----------------------------------------------------
    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False, id_task: str = None):
        job = None
        if id_task is not None:
            job = service.find(id_task)
            if job is None:
                raise NotFound(f"id_task: no job {id_task!r} (finished long ago, or never "
                               "submitted)")
        return a1111.progress(service, job, not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        for job in list(service.queue.running.values()):
            job.interrupted = True
        return None

    @app.post("/sdapi/v1/skip")
    async def skip():
        for job in list(service.queue.running.values()):
            job.skipped = True
        return None

    # -- A1111: options and lists -------------------------------------------------------
    @app.get("/sdapi/v1/options")
    async def get_options():
        return service.options

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await _json(request)
        job = service.set_options(body)
        if job is not None:
            await _wait(request, job)
        return None

    @app.get("/sdapi/v1/cmd-flags")
    async def cmd_flags():
        return service.flags

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": e.title, "model_name": e.name, "hash": e.hash, "sha256": e.sha256,
                 "filename": str(e.path), "config": str(e.config) if e.config else None}
                for e in service.folders.found["checkpoints"]]

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():
        return [{"model_name": e.name, "filename": str(e.path)}
                for e in service.folders.found["vae"]]

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": e.name, "alias": e.name, "path": str(e.path), "metadata": {}}
                for e in service.folders.found["lora"]]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        engine = next((e for e in service.engines if e.pipe is not None), None)
        loaded = {x["token"]: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                               "shape": None, "vectors": x["vectors"]}
                  for x in (engine.pipe.embeddings if engine else [])}
        skipped = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                          "shape": None, "vectors": None}
                   for name in (getattr(engine.pipe, "_skipped_embeddings", []) if engine
                                else [])}
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                 "scale": 4} for name in ("None", "Lanczos", "Nearest")] + [
            {"name": e.name, "model_name": e.path.stem, "model_path": e.filename,
             "model_url": None, "scale": None}
            for e in service.folders.found.get("upscalers", ())]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        from ldm.hires import LABELS, LATENT_MODES
        return [{"name": LABELS[key]} for key in LATENT_MODES]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        service.folders.refresh()
        hash_entry(service.settings.checkpoint)
        return None

    @app.post("/sdapi/v1/refresh-vae")
    async def refresh_vae():
        service.folders.refresh()
        return None

    @app.post("/sdapi/v1/refresh-loras")
    async def refresh_loras():
        service.folders.refresh()
        return None

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        return a1111.png_info(await _json(request), service)

    # -- the sd-webui-controlnet extension's routes -----------------------------------------
    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": 2}

    @app.get("/controlnet/model_list")
    async def controlnet_models():
        return {"model_list": [e.name for e in service.folders.found.get("controlnet", ())]}

    @app.get("/controlnet/module_list")
    async def controlnet_modules():
        return {"module_list": list(a1111.CONTROL_MODULES)}

    @app.post("/controlnet/detect")
    async def controlnet_detect(request: Request):
        return a1111.control_detect(await _json(request), service)

    # -- OpenAI ---------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": e.name, "object": "model", "created": 0, "owned_by": "local"}
            for e in service.folders.found["checkpoints"]]}

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await _json(request)
        gen, settings = openai.read(body, service, "txt2img")
        return await _openai_run(request, gen, settings)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadBody("images/edits takes multipart/form-data (image, mask, prompt...)")
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as e:   # noqa: BLE001 - a malformed form is the client's
            raise BadBody(f"the form cannot be read: {str(e).splitlines()[0] if str(e) else e}") from None
        fields, files = {}, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files.setdefault(key.rstrip("[]"), await value.read())
            else:
                fields.setdefault(key, value)
        gen, settings = openai.read(fields, service, "img2img", files.get("image"),
                                    files.get("mask"))
        return await _openai_run(request, gen, settings)

    async def _openai_run(request, gen, settings):
        job = service.submit(lambda engine, job: service.run(gen, engine, job), settings,
                             gen.kind)
        return openai.response(gen, await _wait(request, job))

    return app


class Guard:
    """ASGI middleware before every route: the credentials (401), then the body limit, by
    its Content-Length (413 before reading) and by what arrives (a chunked body stops at the
    limit)."""

    def __init__(self, app, auth, limit, fail):
        self.app, self.auth, self.limit, self.fail = app, auth, limit, fail

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.auth and not _authorized(request, self.auth):
            body = ({"error": {"message": "wrong or missing credentials", "type":
                               "authentication_error"}} if scope["path"].startswith("/v1/")
                    else {"error": "Unauthorized", "detail": "wrong or missing credentials"})
            response = JSONResponse(body, 401,
                                    headers={"WWW-Authenticate": 'Basic realm="stable diffusion"'})
            return await response(scope, receive, send)
        too_large = _TooLarge(f"the body is more than the server's {self.limit:,} bytes")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.fail(request, too_large)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message
        await self.app(scope, counted, send)


async def _json(request):
    raw = await request.body()
    if len(raw) > request.app.state.service.limits.max_body:
        raise _TooLarge(f"the body is more than the server's "
                        f"{request.app.state.service.limits.max_body:,} bytes")
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadBody(f"the body is not valid JSON ({e})") from None


def _authorized(request, auth):
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
    elif scheme.lower() == "bearer" and request.url.path.startswith("/v1/"):
        user, _, password = value.strip().partition(":")
    else:
        return False
    expected = auth.get(user)
    return expected is not None and secrets.compare_digest(expected.encode(), password.encode())
