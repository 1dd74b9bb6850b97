"""An HTTP server: A1111's API (/sdapi/v1), OpenAI's images API (/v1) and a web page (/).

    pip install -e ".[server]"
    python scripts/serve.py                       # http://127.0.0.1:7860, the default model
    python scripts/serve.py --ckpt models/ldm/stable-diffusion-v1/model.ckpt --listen \\
        --api-auth me:secret

Clients choose among the checkpoints, VAEs, LoRAs and embeddings of --models-dir (A1111's
layout) by name; nothing outside those folders is ever loaded. Requests run one at a time,
first in first out; images are saved (under --outdir) only when a request asks.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from ldm import cli  # noqa: E402
from ldm.cli import number  # noqa: E402

CHECKOUT_MODELS = Path(__file__).resolve().parents[1] / "models"


def build_parser():
    p = cli.ArgumentParser(description="Serve Stable Diffusion over HTTP: A1111's and "
                                       "OpenAI's APIs and a web page.")
    s = p.add_argument_group("serving")
    s.add_argument("--port", type=number(int, 1, 65535), default=7860,
                   help="port (default 7860, A1111's)")
    s.add_argument("--listen", action="store_true",
                   help="serve every network interface (0.0.0.0), not only this machine; "
                        "needs --api-auth or --insecure")
    s.add_argument("--api-auth", "--api_auth", dest="api_auth", default=None,
                   metavar="USER:PASS[,USER2:PASS2]",
                   help="HTTP basic auth on every route and the page (OpenAI clients send "
                        "USER:PASS as their API key)")
    s.add_argument("--insecure", action="store_true",
                   help="allow --listen without --api-auth")
    s.add_argument("--outdir", type=cli.nonempty, default="outputs",
                   help="where images are saved when a request asks (save_images): "
                        "OUTDIR/txt2img-images, OUTDIR/img2img-images")
    f = p.add_argument_group("models folders (A1111's layout; only these files can be loaded)")
    f.add_argument("--models-dir", "--models_dir", dest="models_dir", type=cli.nonempty,
                   default=str(Path("models") if Path("models").is_dir() else CHECKOUT_MODELS),
                   help="the models folder (default: ./models, else the checkout's)")
    f.add_argument("--ckpt-dir", dest="ckpt_dir", default=None,
                   help="checkpoints (default: the models folder, searched below)")
    f.add_argument("--vae-dir", dest="vae_dir", default=None,
                   help="autoencoders (default: MODELS/VAE)")
    f.add_argument("--lora-dir", dest="lora_dir", default=None,
                   help="LoRAs, used as <lora:name:weight> in prompts (default: MODELS/Lora)")
    f.add_argument("--embeddings-dir", dest="embeddings_dir", default=None,
                   help="textual-inversion embeddings, all loaded (default: MODELS/embeddings)")
    lim = p.add_argument_group("limits per request")
    lim.add_argument("--max-pixels", dest="max_pixels", type=number(int, 4096),
                     default=2048 * 2048, help="pixels per image (default 2048x2048)")
    lim.add_argument("--max-request-pixels", dest="max_request_pixels", type=number(int, 4096),
                     default=16 * 2048 * 2048,
                     help="pixels of all a request's images (default 16 x 2048x2048)")
    lim.add_argument("--max-batch", dest="max_batch", type=number(int, 1), default=16,
                     help="images per request (default 16)")
    lim.add_argument("--max-body-mb", dest="max_body_mb", type=number(int, 1), default=64,
                     help="request body size in MiB (default 64)")
    lim.add_argument("--max-prompt-chars", dest="max_prompt_chars", type=number(int, 1),
                     default=20000, help="characters per prompt (default 20000)")
    lim.add_argument("--max-queue", dest="max_queue", type=number(int, 1), default=256,
                     help="jobs waiting before new ones get 503 (default 256)")
    cli.add_model_arguments(p)
    p.set_defaults(prompt_syntax="a1111")   # A1111's clients write A1111's prompt syntax
    return p


def run(args, job):
    for flag in ("lora", "embedding"):
        if getattr(args, flag):
            raise cli.UsageError(f"--{flag}: the server takes them from its folders "
                                 f"(--{flag if flag == 'lora' else 'embeddings'}-dir)")
    for flag in ("vae", "unet"):
        if getattr(args, flag):
            raise cli.UsageError(f"--{flag}: not for the server (its autoencoders are chosen "
                                 "by name from --vae-dir: the sd_vae option)")
    from ldm.server import check_installed, serve
    check_installed()
    cli.check_safety_checker(args)
    serve(args, job)


def main(argv=None):
    return cli.main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
