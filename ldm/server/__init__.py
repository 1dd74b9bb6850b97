"""An HTTP server for the clients people already use: A1111's ``/sdapi/v1``, OpenAI's images
API and a web page, over one loaded model and one queue (``scripts/serve.py``).

Needs the ``server`` extra (``pip install -e ".[server]"``: FastAPI, uvicorn,
python-multipart); nothing else in the library imports this package.

- ``folders``: the models folders, the only files a client can have loaded
- ``worker``: the FIFO queue, its jobs and the engine (pipeline) per device
- ``service``: options, limits, checks and running a generation, without HTTP
- ``a1111``, ``openai``: the two dialects, read into ``Generation``s and answered
- ``app``: the FastAPI routes; ``static/index.html``: the page
"""
import copy
import logging
from pathlib import Path

from ldm.errors import UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = 'the server needs its extra: pip install -e ".[server]"'


def check_installed():
    import importlib.util
    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                            ("multipart", "python-multipart")):
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"{INSTALL_HINT} ({package} is missing)")


def parse_auth(text):
    """``user:pass[,user2:pass2]`` -> {user: pass}."""
    users = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UsageError(f"--api-auth {text!r}: give user:password pairs separated by "
                             "commas")
        users[user] = password
    return users


def build_service(args):
    """The ``Service`` the flags describe: folders scanned, the first model chosen (not
    loaded), one engine per device."""
    from ldm.server.folders import Folders
    from ldm.server.service import Limits, Service
    from ldm.config import choose_model
    folders = Folders.under(args.models_dir, args.ckpt_dir, args.vae_dir, args.lora_dir,
                            args.embeddings_dir)
    choice = choose_model(args.ckpt, args.config)
    folders.extra_checkpoints = [choice.ckpt]
    folders.refresh()
    initial = folders.entry_for(choice.ckpt)
    if args.config:
        initial.config = Path(args.config)
    devices = [d.strip() for d in args.device.split(",") if d.strip()] or ["auto"]
    limits = Limits(args.max_pixels, args.max_request_pixels, args.max_batch,
                    args.max_body_mb * 2 ** 20, args.max_prompt_chars, args.max_queue)
    service = Service(folders, loader(args, folders), initial, devices, limits, args.outdir,
                      args.prompt_syntax)
    service.flags = {k: v for k, v in vars(args).items() if k != "api_auth"}
    return service


def loader(args, folders):
    """``load(entry, vae, device) -> Pipeline`` with the server's flags: the scripts' own
    loading (``cli.load_pipeline``), then the embeddings folder and the preview map."""
    from ldm import cli
    from ldm.errors import LdmError

    def load(entry, vae, device):
        from ldm.preview import FullPreview, LatentPreview
        a = copy.copy(args)
        a.ckpt, a.config = str(entry.path), (str(entry.config) if entry.config else None)
        a.vae = str(vae.path) if vae is not None else None
        a.device, a.lora, a.embedding = device, [], []
        pipe = cli.load_pipeline(a, cli.choose_model(a))
        pipe.model_name = entry.name   # as clients name it, not a path on this machine
        skipped = []
        for e in folders.found.get("embeddings", ()):
            try:
                pipe.load_embedding(e.path)
            except LdmError:
                skipped.append(e.name)
        pipe._skipped_embeddings = skipped
        pipe._previews = {"cheap": LatentPreview(pipe), "full": FullPreview(pipe),
                          "taesd": tiny_preview(pipe, folders.found.get("vae_approx", ()))}
        return pipe
    return load


def tiny_preview(pipe, entries):
    """A TinyPreview from the first TAESD decoder in ``entries`` (the VAE-approx folder) that
    fits ``pipe``'s latents (taesdxl for SDXL, taesd for SD 1/2), else None."""
    from ldm.errors import LdmError
    from ldm.pipeline import read_tiny_vae
    from ldm.preview import TinyPreview
    if pipe.factor != 8:
        return None   # TAESD's latents are 8x8 pixels (the built-in model's are 4x4)
    xl = hasattr(pipe.model, "conditioner")
    ranked = sorted(entries, key=lambda e: ("xl" in e.filename.lower()) != xl)
    for entry in ranked:
        if ("xl" in entry.filename.lower()) != xl:
            break   # its colours would be off (read_tiny_vae warns): the cheap map instead
        try:
            found = read_tiny_vae(pipe.model, entry.path, "VAE-approx")
        except LdmError as e:
            log.info("live previews: %s not used: %s", entry.filename, e)
            continue
        if found is not None:
            log.info("live previews: %s", entry.filename)
            return TinyPreview(found[0].to(pipe.device))
    return None


def serve(args, job=None):
    """Run the server until Ctrl-C (``scripts/serve.py``; ``job``: the script's
    ``ldm.cli.Job``, which then counts the images saved)."""
    import uvicorn
    from ldm.image_io import check_output_folder
    from ldm.server.app import create_app
    auth = parse_auth(args.api_auth) if args.api_auth else None
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen and not auth and not args.insecure:
        raise UsageError("--listen serves every machine that can reach this one: add "
                         "--api-auth user:password, or --insecure to serve without it")
    check_output_folder(args.outdir)
    service = build_service(args)
    if job is not None:
        job.track(service.outputs)
    logging.getLogger("ldm.server").setLevel(logging.INFO)
    log.info("loading %s", service.settings.checkpoint.name)
    service.start()
    app = create_app(service, auth)
    log.info("serving on http://%s:%d (the page at /, A1111's API at /sdapi/v1, OpenAI's at "
             "/v1)%s", "localhost" if not args.listen else host, args.port,
             "" if auth else " without auth")
    config = uvicorn.Config(app, host=host, port=args.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run()   # until Ctrl-C or SIGTERM, which it handles itself
    finally:
        service.close()
    log.info("stopped: %s", job.summary() if job is not None else "done")
