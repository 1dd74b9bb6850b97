"""The command-line layer every script shares (txt2img now; img2img, inpaint and later ones).

- Parsing fails in one line: ``error: argument --scale: ... (see --help)``, exit status 2;
  number types reject NaN, infinities and values out of range; ``--seed -1`` draws a seed.
- Every check that needs no weights runs before the slow model load: flags against each
  other, sizes and steps against the model's config, prompt files, the output folder,
  the device, the memory a size needs.
- One error type per kind of failure (``ldm.errors``), each mapped to one line and an exit
  status; Ctrl-C is handled from the first line of ``main`` to the last (exit 130), and a
  file being written when it comes is finished first, never left half-written.
- Output folders are created when their first file is written (``ldm.image_io.Outputs``).
- Messages go through one log handler that writes above the progress bar and says each
  distinct message once per run; a non-terminal stderr gets plain lines (``ldm.progress``).

A script is ``build_parser()`` plus ``run(args, job)``; ``main(build_parser, run, argv)``
does the rest.
"""
import argparse
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path

from ldm import request as req
from ldm.samplers import DEFAULT_SAMPLER, SAMPLERS, SCHEDULES
from ldm.backends import BACKENDS, DEFAULT_BACKEND, INSTALL_HINT as BACKEND_HINT
from ldm.errors import InputError, LdmError, ResourceError, UsageError
from ldm.request import FLAGS, SEED_MAX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
INTERRUPTED = 130            # 128 + SIGINT, what a shell reports for Ctrl-C
TERMINATED = 143             # 128 + SIGTERM

log = logging.getLogger("ldm.cli")


# ------------------------------------------------------------------------------ parsing

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) raised as UsageError."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def number(kind=float, lo=None, hi=None):
    """An argparse type: a finite ``kind`` (int or float) in [lo, hi] (either may be None),
    checked by ``ldm.request.check_number``, as the library checks its values."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            try:  # "1.5" for an int: the library's message ("1.5 is not an integer")
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        try:
            return req.check_number(value, kind, lo, hi)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def field(key):
    """The argparse type of a request's numeric field (``ldm.request.LIMITS``)."""
    limit = req.LIMITS[key]
    return number(limit.kind, limit.lo, limit.hi)


def pair(key):
    """The argparse type of a request's (height, width) or (top, left) pair: "H,W"."""
    def parse(text):
        try:
            return req._pair(key, text, lambda k: "")
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None
    return parse


def seed(text):
    """An argparse type: a seed in [0, 2**64 - 1], or -1 for a random one (drawn later)."""
    try:
        value = int(text)
    except ValueError:
        try:  # "1.5": the library's message ("1.5 is not an integer")
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        return req.check_seed(value)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def plural(count, noun):
    """"1 image", "2 images"."""
    return f"{count} {noun}{'s' * (count != 1)}"


def nonempty(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def draw_seed(args):
    """``--seed -1``: a random seed, said once and recorded in every image like any other."""
    if args.seed == req.RANDOM_SEED:
        args.seed = req.draw_seed()
        log.info("seed: %d (drawn at random; --seed %d makes these images again)",
                 args.seed, args.seed)
    return args.seed


def check_seed_span(first, count):
    """Image k of a run has seed ``first + k``: all of them must be valid seeds."""
    if first + count - 1 > SEED_MAX:
        raise UsageError(f"--seed {first} is too large for {count} images: image k has seed "
                         f"--seed + k, which must stay below 2**64")


def add_sampling_arguments(p, outdir, n_samples=3, n_iter=2, scale=7.5, jsonl=False):
    """The flags every generating script has, with CompVis' names (and per-script
    defaults where CompVis' scripts differ)."""
    p.add_argument("--negative-prompt", "--negative_prompt", dest="negative_prompt", default="",
                   help="what the image should not show (replaces the empty unconditional "
                        "prompt; needs --scale other than 1)")
    p.add_argument("--outdir", type=nonempty, default=outdir, help="dir to write results to")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=field("steps"),
                   default=None, help="number of sampling steps (default: the model's, 50)")
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"sampler, by id or A1111 name (default: the model's, "
                        f"{DEFAULT_SAMPLER}): {', '.join(SAMPLERS)}; e.g. "
                        f"\"DPM++ 2M Karras\", \"Euler a\"")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="noise schedule of the sigma samplers (default: discrete, the "
                        "model's own timesteps, or the one the sampler's name says)")
    p.add_argument("--plms", action="store_true", help="use PLMS sampling (= --sampler plms)")
    p.add_argument("--ddim_eta", type=field("eta"),
                   default=None,
                   help="DDIM eta in [0, 1] (default 0: deterministic), or the noise of the "
                        "ancestral and SDE samplers (default 1)")
    p.add_argument("--n_iter", type=number(int, 1), default=n_iter, help="sample this often")
    p.add_argument("--n_samples", type=number(int, 1), default=n_samples,
                   help="batch size: images per prompt per iteration")
    p.add_argument("--n_rows", type=number(int, 0), default=0,
                   help="images per grid row (default: n_samples)")
    p.add_argument("--scale", type=field("scale"), default=None,
                   help="classifier-free guidance scale in [0, 100] (default: the model "
                        f"config's own `sampling: scale:`, as the built-in model has, else "
                        f"{scale})")
    p.add_argument("--slg", type=field("slg"), default=None, metavar="SCALE",
                   help="SD 3: skip-layer guidance at this scale (Stability's SD 3.5 Medium: "
                        "2.5 with --scale 4; blocks 7-9, 1%%-20%% of the steps); default 0: none")
    p.add_argument("--rescale", type=field("rescale"), default=None,
                   help="guidance rescale in [0, 1] (Lin et al. 2023; diffusers' "
                        "guidance_rescale, 0.7 for zero-terminal-SNR v models; default 0: "
                        "none)")
    xl = p.add_argument_group("SDXL's size conditioning (other models ignore it)")
    xl.add_argument("--original_size", type=pair("original_size"), default=None,
                    metavar="H,W", help="the size the model is told the image had before "
                    "cropping (default: the output size, as diffusers)")
    xl.add_argument("--crop", type=pair("crop"), default=None, metavar="TOP,LEFT",
                    help="the crop's top-left corner the model is told (default 0,0: "
                    "centred subjects)")
    xl.add_argument("--target_size", type=pair("target_size"), default=None, metavar="H,W",
                    help="the size the model is told to aim at (default: the output size)")
    xl.add_argument("--refiner", type=nonempty, default=None, metavar="CKPT",
                    help="a refiner (SDXL's) that denoises the last steps of every image: "
                    "the base runs the first --refiner_switch of the schedule, the refiner "
                    "the rest (diffusers' ensemble of experts)")
    xl.add_argument("--refiner_config", type=nonempty, default=None, metavar="YAML",
                    help="the refiner's config (default: found from its weights)")
    xl.add_argument("--refiner_switch", type=field("refiner_switch"), default=None,
                    metavar="FRACTION", help="the share of the schedule the base denoises "
                    "before the refiner takes over (default 0.8)")
    xl.add_argument("--aesthetic_score", type=field("aesthetic_score"), default=None,
                    help="the refiner's aesthetic score (default 6.0)")
    xl.add_argument("--negative_aesthetic_score", type=field("negative_aesthetic_score"),
                    default=None, help="the refiner's aesthetic score for the negative "
                    "prompt (default 2.5)")
    p.add_argument("--from-file", "--from_file", dest="from_file", type=nonempty,
                   help="a text file with one prompt per line, or a JSONL job (.jsonl: one "
                        "JSON object a line, with \"prompt\" and any of negative_prompt, "
                        "seed, steps, scale, sampler, H, W, n; see the README)"
                   if jsonl else "a text file with one prompt per line")
    p.add_argument("--seed", type=seed, default=42,
                   help="seed of image 0; image k uses seed + k; -1 draws one")


def add_model_arguments(p):
    p.add_argument("--config", type=nonempty, default=None,
                   help="model config (default: config.yaml beside the checkpoint, else SD v1's)")
    p.add_argument("--ckpt", type=nonempty, default=None,
                   help="checkpoint (default: models/ldm/stable-diffusion-v1/model.ckpt if "
                        "present, else the built-in model); builtin, builtin-fast (4 steps), "
                        "builtin-inpainting and builtin-inpainting-fast name the built-in "
                        "models")
    p.add_argument("--precision", choices=["full", "autocast", "bf16"], default="autocast",
                   help="autocast: fp16 on CUDA, fp32 elsewhere; full: fp32; bf16: bfloat16 autocast")
    p.add_argument("--device", type=nonempty, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--safety_checker", type=nonempty, default=None, metavar="PATH|none",
                   help="safety checker weights (default: models/safety_checker/ or the HF "
                        "cache); 'none' turns it off")
    t = p.add_argument_group("LoRA, embeddings, VAE and prompts (see the README's "
                             "\"SD 1.x toolbox\")")
    t.add_argument("--lora", action="append", type=lora_spec, default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA or LoCon file (kohya-ss or diffusers/PEFT naming), merged "
                        "with WEIGHT (default 1); repeat for several")
    t.add_argument("--embedding", action="append", type=embedding_spec, default=[],
                   metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (A1111 .pt/.safetensors, diffusers "
                        ".bin); its token, the file's name unless given, can be used in "
                        "prompts and negative prompts; repeat for several")
    t.add_argument("--prompt-syntax", "--prompt_syntax", dest="prompt_syntax",
                   choices=["compvis", "a1111"], default="compvis",
                   help="compvis: plain text, cut at 77 tokens (CompVis'); a1111: (word), "
                        "[word], (word:1.3), BREAK and prompts of any length, as A1111")
    t.add_argument("--vae", type=nonempty, default=None, metavar="FILE",
                   help="an autoencoder that replaces the checkpoint's (e.g. "
                        "vae-ft-mse-840000-ema-pruned; CompVis or diffusers layout), or a "
                        "tiny one (TAESD: taesd_decoder.pth, its encoder file beside it) "
                        "that decodes in a fraction of the time")
    t.add_argument("--preview", type=number(int, 1, None), default=None, metavar="N",
                   help="every N steps, write the current estimate of the batch's first "
                        "image to OUTDIR/preview.png (replaced whole; removed at the end)")
    t.add_argument("--preview_vae", "--preview-vae", dest="preview_vae", type=nonempty,
                   default=None, metavar="FILE",
                   help="a TAESD decoder for --preview's pictures (default: --vae's when it "
                        "is one, else a cheap linear map of the latents)")
    t.add_argument("--unet", type=nonempty, default=None, metavar="FILE",
                   help="a UNet that replaces the checkpoint's (e.g. SDXL-Lightning's "
                        "sdxl_lightning_4step_unet.safetensors; original or diffusers layout)")
    for name, what in (("clip_l", "CLIP ViT-L (clip_l.safetensors)"),
                       ("clip_g", "OpenCLIP ViT-bigG (clip_g.safetensors)"),
                       ("t5xxl", "T5-XXL's encoder (t5xxl_fp16.safetensors)")):
        t.add_argument(f"--{name}", type=nonempty, default=None, metavar="FILE",
                       help=f"SD 3: {what}, for a checkpoint without it or to replace it")
    t.add_argument("--t5_tokenizer", "--t5-tokenizer", dest="t5_tokenizer", type=nonempty,
                   default=None, metavar="PATH",
                   help="SD 3: T5's tokenizer (spiece.model, tokenizer.json, or a folder with "
                        "either: a diffusers folder's tokenizer_3/); default models/t5/")
    t.add_argument("--t5_length", "--t5-length", dest="t5_length", type=number(int, 1, 512),
                   default=None, metavar="N",
                   help="SD 3: the tokens T5 reads (default 256, diffusers'; Stability's "
                        "reference: 77)")
    t.add_argument("--clip-skip", "--clip_skip", dest="clip_skip", type=number(int, 1, 12),
                   default=1, metavar="N",
                   help="condition on the text encoder's N-th layer from the end (A1111's "
                        "meaning: 1 = the last, 2 = the penultimate), final layer norm applied")
    c = p.add_argument_group("ControlNet (see the README's \"ControlNet\"); each flag "
                             "repeats, the Nth of each going with the Nth --control")
    c.add_argument("--control", action="append", type=nonempty, default=[], metavar="FILE",
                   help="a ControlNet for the model (lllyasviel's control_*.pth/.safetensors "
                        "or a diffusers ControlNetModel folder or file)")
    c.add_argument("--control_image", "--control-image", dest="control_image",
                   action="append", type=nonempty, default=[], metavar="IMAGE",
                   help="its control map (edges, depth, pose...: the image it reads), "
                        "resized to the image's size")
    c.add_argument("--control_preprocess", "--control-preprocess", dest="control_preprocess",
                   action="append", type=nonempty, default=[], metavar="NAME[:N:N]",
                   help="make the map from the image first: canny[:LOW:HIGH] (edges), "
                        "scribble[:LOW:HIGH] (thick edges), threshold[:LEVEL], invert, none "
                        "(default); scripts/control_map.py saves what it makes")
    c.add_argument("--control_weight", "--control-weight", dest="control_weight",
                   action="append", type=number(float, 0.0, 2.0), default=[], metavar="W",
                   help="its weight (default 1)")
    c.add_argument("--control_mode", "--control-mode", dest="control_mode", action="append",
                   choices=["balanced", "prompt", "control", "guess"], default=[],
                   help="A1111's control modes: balanced (default), prompt (my prompt is "
                        "more important), control (ControlNet is more important); guess: "
                        "diffusers' guess mode (works without a prompt)")
    c.add_argument("--control_start", "--control-start", dest="control_start",
                   action="append", type=number(float, 0.0, 1.0), default=[], metavar="A",
                   help="the fraction of the steps it starts at (default 0)")
    c.add_argument("--control_end", "--control-end", dest="control_end", action="append",
                   type=number(float, 0.0, 1.0), default=[], metavar="B",
                   help="the fraction of the steps it ends at (default 1)")
    g = p.add_argument_group("speed and memory (all off by default; see the README's "
                             "\"Speed and precision\")")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (inductor: a C++ compiler on the CPU, Triton "
                        "on CUDA); the first image compiles, for about 2 minutes on a 2-core CPU")
    g.add_argument("--deepcache", type=number(int, 1, 1000), default=None, metavar="N",
                   help="DeepCache: run the whole UNet on every N-th call only and reuse its "
                        "deep features between (N=3: about 2x faster, a close but not equal "
                        "image)")
    g.add_argument("--attention_slicing", "--attention-slicing", type=number(int, 1),
                   nargs="?", const=1024, default=None, metavar="ROWS",
                   help="attention in slices of ROWS queries (default 1024): less memory "
                        "where attention is not fused (MPS), exact")
    g.add_argument("--vae_tiling", "--vae-tiling", type=number(int, 16), nargs="?", const=64,
                   default=None, metavar="LATENT_PX",
                   help="decode and encode in blended tiles of LATENT_PX latent pixels "
                        "(default 64, 512 px for SD), for images too large to decode whole")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="what runs the networks: torch, or openvino (CPU; converted once per "
                        "model and cached, then each step about 1.6x faster; "
                        f"{BACKEND_HINT}); default auto: openvino on a CPU when it is "
                        "installed and the model is SD-sized, else torch")
    g.add_argument("--offload", action="store_true",
                   help="CUDA: keep the weights on the CPU and move the text encoder, UNet "
                        "and autoencoder to the GPU only while each runs")


def add_hires_arguments(p):
    """A1111's hires fix flags (text-to-image)."""
    h = p.add_argument_group("hires fix (A1111's): the image made at --H/--W, upscaled, then "
                             "refined at the larger size with the same seed; any of these "
                             "turns it on")
    h.add_argument("--enable_hr", "--hr", dest="enable_hr", action="store_true",
                   help="hires fix with A1111's defaults: --hr_scale 2, --hr_upscaler latent, "
                        "--denoising_strength 0.7")
    h.add_argument("--hr_scale", type=field("hr_scale"), default=None, metavar="X",
                   help="upscale by X in [1, 8] (default 2)")
    h.add_argument("--hr_resize_x", type=field("hr_resize_x"), default=None, metavar="W",
                   help="upscale to this width instead (with --hr_resize_y: to cover both, "
                        "then cropped to them; alone: the height from the aspect ratio)")
    h.add_argument("--hr_resize_y", type=field("hr_resize_y"), default=None, metavar="H",
                   help="upscale to this height instead")
    h.add_argument("--hr_upscaler", type=nonempty, default=None, metavar="NAME|FILE",
                   help="latent (default), latent-antialiased, latent-bicubic, "
                        "latent-bicubic-antialiased, latent-nearest, latent-nearest-exact "
                        "(the latents interpolated), lanczos, nearest (the image resized), "
                        "A1111's names (\"Latent (nearest)\"), or an upscaler model's file "
                        "(the SD x4 upscaler)")
    h.add_argument("--hr_steps", "--hr_second_pass_steps", dest="hr_steps",
                   type=field("hr_steps"), default=None, metavar="N",
                   help="steps of the second pass (default 0: --ddim_steps'), all run, as A1111")
    h.add_argument("--denoising_strength", type=field("hr_strength"), default=None,
                   metavar="S", help="how much the second pass changes, in [0, 1] (default "
                   "0.7; below 0.5 the latent upscalers leave a blur)")


HIRES_FLAGS = ("hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_steps",
               "denoising_strength")


def hires_spec(args):
    """The hires fix the flags ask for, as ``Hires.build``'s keywords (the upscaler still
    a name or a file's path), or None. Checked before the load."""
    if not (getattr(args, "enable_hr", False)
            or any(getattr(args, k, None) is not None for k in HIRES_FLAGS)):
        return None
    from ldm.hires import Hires, upscaler_key
    spec = dict(scale=args.hr_scale, upscaler=args.hr_upscaler, steps=args.hr_steps,
                strength=args.denoising_strength, resize_x=args.hr_resize_x,
                resize_y=args.hr_resize_y)
    name = args.hr_upscaler
    if name is not None and upscaler_key(name) is None:
        if not Path(name).exists():
            Hires.build(**spec, names=FLAGS)   # not a name: says which there are
        spec["upscaler"] = None   # a file: loaded with the model
    Hires.build(**spec, names=FLAGS)
    spec["upscaler"] = name
    return spec


def hires_of(spec, pipe):
    """``hires_spec``'s keywords with an upscaler model's file loaded for ``pipe``."""
    from ldm.hires import upscaler_key
    name = spec["upscaler"]
    if name is None or upscaler_key(name) is not None:
        return spec
    from ldm.upscalers import SDUpscaler, load_upscaler
    upscaler = load_upscaler(name, pipe, flag="--hr_upscaler")
    if isinstance(upscaler, SDUpscaler):
        log.info("--hr_upscaler %s is the SD x4 upscaler: each first-pass image is made 4x "
                 "larger in its own denoising steps between the two passes (not on the "
                 "progress bar)", upscaler.name)
    return dict(spec, upscaler=upscaler)


def lora_spec(text):
    """An argparse type: ``FILE`` or ``FILE:WEIGHT`` -> (FILE, weight). The weight is what
    follows the last colon when that parses as a finite number (so ``C:\\x.safetensors``
    stays a path)."""
    path, sep, tail = text.rpartition(":")
    weight = 1.0
    if sep and path:
        try:
            weight = float(tail)
        except ValueError:
            if Path(path).is_file() and not Path(text).exists():
                raise argparse.ArgumentTypeError(
                    f"{text}: the weight {tail!r} is not a number (FILE:WEIGHT, e.g. "
                    f"{path}:0.8)") from None
            path = text
        else:
            if not math.isfinite(weight):
                raise argparse.ArgumentTypeError(f"{text}: the weight {tail} is not finite")
    else:
        path = text
    if not path.strip():
        raise argparse.ArgumentTypeError("needs a file")
    return path, weight


def embedding_spec(text):
    """An argparse type: ``FILE`` or ``FILE:TOKEN`` -> (FILE, TOKEN or None). A text that
    is itself an existing file is a file (``C:\\x.pt``, a name with a colon)."""
    path, sep, token = text.rpartition(":")
    if Path(text).exists() or not sep or not path or any(c in token for c in "/\\"):
        return text, None
    if not token.strip():
        raise argparse.ArgumentTypeError(f"{text}: the token after ':' is empty")
    return path, token


def check_model_files(args):
    """The files a run adds to the model (safety checker, LoRAs, VAE) exist, before the
    slow load."""
    check_safety_checker(args)
    for path, _ in getattr(args, "lora", None) or ():
        if not Path(path).exists():
            raise InputError(f"--lora {path}: not found")
        if Path(path).is_dir():
            from ldm.lora import lora_file
            lora_file(path)  # a folder must hold diffusers' pytorch_lora_weights file
    for path, _ in getattr(args, "embedding", None) or ():
        if not Path(path).is_file():
            raise InputError(f"--embedding {path}: " + (
                "is a folder: give the embedding file itself" if Path(path).is_dir()
                else "not found"))
    controls = getattr(args, "control", None) or []
    for path in controls:
        if not Path(path).exists():
            raise InputError(f"--control {path}: not found")
    if controls or getattr(args, "control_image", None):
        images = args.control_image
        if len(images) != len(controls):
            raise UsageError(f"{len(controls)} --control and {len(images)} --control_image: "
                             "give one control image for each ControlNet")
        for flag in ("control_preprocess", "control_mode", "control_weight", "control_start",
                     "control_end"):
            if len(getattr(args, flag)) > len(controls):
                raise UsageError(f"more --{flag} than --control ({len(controls)})")
        from ldm.controlnet import parse_preprocess
        for spec in args.control_preprocess:
            parse_preprocess(spec)
        for i in range(len(controls)):
            start = (args.control_start + [0.0] * len(controls))[i]
            end = (args.control_end + [1.0] * len(controls))[i]
            if start >= end:
                raise UsageError(f"--control_start {start:g} is not before --control_end "
                                 f"{end:g}: the ControlNet would act in no step")
    for flag in ("vae", "unet"):
        path = getattr(args, flag, None)
        if path is not None and not Path(path).exists():
            raise InputError(f"--{flag} {path}: not found")
    refiner = getattr(args, "refiner", None)
    if refiner is not None and not Path(refiner).exists():
        raise InputError(f"--refiner {refiner}: not found")


def read_prompts(path):
    """Prompts from a text file: UTF-8 (a BOM is fine), any line endings, blank lines
    skipped. A JSONL prompt file is refused here (``read_job``)."""
    from ldm.jobs import is_jsonl
    text = read_prompt_text(path)
    if is_jsonl(path, text):
        raise UsageError(f"--from-file {path} is a JSONL prompt file: this script takes "
                         "plain text, one prompt a line (JSONL jobs are txt2img's and "
                         "img2img's)")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def read_job(args):
    """A JSONL --from-file's checked requests (``ldm.jobs``), or None for any other run."""
    from ldm.jobs import is_jsonl, parse_jsonl
    if not args.from_file:
        return None
    text = read_prompt_text(args.from_file)
    return parse_jsonl(text, args.from_file) if is_jsonl(args.from_file, text) else None


def check_requests(args, choice, requests, size=None):
    """Each JSONL line's sampler, steps, size and guidance against the model, before the
    load (``ldm.request.sampling``, as every request is checked); returns {line: (sampler,
    schedule, eta)}. ``size`` (height, width): the run's fixed size (img2img: the init
    image's), where lines may not set H and W."""
    from ldm.jobs import NAMES, settings
    import_torch()
    info = req.ModelInfo.of_choice(choice)
    g = choice.geometry
    resolved = {}
    for r in requests:
        negative, sampler, steps, scale, height, width = settings(r, args)
        where = f"{args.from_file} line {r.line}"
        if size is not None:
            if r.H is not None or r.W is not None:
                raise InputError(f"{where}: H and W are txt2img's; here the size is the "
                                 "init image's (or --H/--W)")
            height, width = size
        own = sampler is not None  # the line's own sampler, at its own schedule and eta
        try:
            values = req.sampling("txt2img" if size is None else "img2img", info,
                                  bool(negative), sampler if own else args.sampler,
                                  None if own else args.schedule,
                                  None if own else args.ddim_eta, steps, scale, NAMES)
        except UsageError as e:
            raise InputError(f"{where}: {str(e).split(';')[0]}") from None
        resolved[r.line] = (values["sampler"], values["schedule"], values["eta"])
        try:
            check_size(g, height or g.native_size, width or g.native_size, args.n_samples,
                       args.device, args.vae_tiling)
        except UsageError as e:
            raise InputError(f"{where}: {e}") from None
    return resolved


def read_prompt_text(path):
    """A prompt file's text: UTF-8 (a BOM is fine); one line errors otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"prompt file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"--from-file {path} is a folder: give a text file, one prompt "
                         "a line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read prompt file {path} as UTF-8 text "
                         f"({e.__class__.__name__})") from None
    if "\x00" in text:
        raise InputError(f"prompt file {path} is not a text file (it holds NUL bytes)")
    return text


def add_image_size_arguments(p):
    """--H/--W/--resize-mode/--full-size for scripts that start from an image."""
    from ldm.image_io import RESIZE_MODES
    p.add_argument("--H", type=field("height"), default=None,
                   help="height to sample at (default: the image's, down to a multiple of the "
                        "model's factor)")
    p.add_argument("--W", type=field("width"), default=None, help="width to sample at")
    p.add_argument("--resize-mode", "--resize_mode", dest="resize_mode", choices=RESIZE_MODES,
                   default="resize", help="with --H/--W: resize (stretch), crop (scale to "
                   "cover, crop the centre) or fill (scale to fit, fill with the edges)")
    p.add_argument("--full-size", "--full_size", dest="full_size", action="store_true",
                   help=f"keep an image of more than {req.LARGE_INPUT_AREA}x the model's "
                        "own area at its size (by default it is sampled at the model's own "
                        "area, as the work grows with the area: a 12-megapixel photo would "
                        "take hours)")


def read_image(path, args, info, what="image", change=None):
    """(image, (width, height)): an input image as a person brings it (``load_image``;
    ``change``: a function of it, e.g. the outpainting canvas), and the size it is sampled
    at (``ldm.request.working_size``: ``--H``/``--W``, else its own down to multiples of
    the model's factor, or the model's own area for a very large image unless
    --full-size), said in one line when it changes."""
    from ldm.image_io import load_image
    image = load_image(path, what)
    if change is not None:
        image = change(image)
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None and value % info.factor:
            raise UsageError(f"{flag} {value} is not a multiple of {info.factor}, this "
                             "model's factor")
    size, note = req.working_size(image.size, info.factor, info.native_size, args.H, args.W,
                                  args.full_size, FLAGS)
    if note:
        log.warning(note)
    return image, size


def prompt_list(args):
    """The prompts of a run: --from-file's, else --prompt."""
    return read_prompts(args.from_file) if args.from_file else [args.prompt]


def batches(args, prompts):
    """[(prompts, seeds)] in CompVis order: for each iteration, for each batch of
    --n_samples prompts (one prompt fills a batch). Image k of the run has seed --seed + k;
    with --fixed_code (txt2img) every batch reuses one set of start codes, as CompVis'
    start_code: image j of a batch has seed --seed + j."""
    if len(prompts) == 1:
        data = [prompts * args.n_samples]
    else:
        data = [prompts[i:i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
    out, k = [], 0
    for _ in range(args.n_iter):
        for group in data:
            first = args.seed if getattr(args, "fixed_code", False) else args.seed + k
            out.append((group, list(range(first, first + len(group)))))
            k += len(group)
    check_seed_span(args.seed, k)
    return out


def generate_batches(args, out, work, steps_per_batch, make, pipe=None):
    """Run ``make(prompts, seeds, callback, *extra) -> samples`` for every batch
    ``(prompts, seeds, *extra)`` of ``work`` under one progress bar (``steps_per_batch``: a
    number, or a function of the batch), saving each sample as OUTDIR/samples/NNNNN.png
    (unless --skip_save) and a grid (unless --skip_grid); with --preview, ``pipe``'s
    preview of the running batch in OUTDIR/preview.png. Returns the samples."""
    from ldm.image_io import make_grid
    from ldm.progress import progress
    done = []
    total = (sum(steps_per_batch(item) for item in work) if callable(steps_per_batch)
             else len(work) * steps_per_batch)
    preview = preview_file(args, pipe, out)
    try:
        with progress(total, "sampling") as bar:
            done = _batches(args, out, work, make, stepper(bar, preview), bar)
    finally:
        if preview is not None:
            preview.close()
    if not args.skip_grid and len({s.image.size for s in done}) > 1:
        log.info("no grid: the images are of different sizes")
    elif not args.skip_grid and done:
        grid = make_grid([s.image for s in done], args.n_rows or args.n_samples)
        out.save_numbered(grid, "grid-{:04}.png", {"grid_of": [s.parameters for s in done]})
    print(f"Your samples are ready and waiting for you here: \n{out.root} \n \nEnjoy.")
    return done


def preview_file(args, pipe, out):
    """The ``ldm.preview.PreviewFile`` that --preview asks for (OUTDIR/preview.png), or
    None."""
    if not getattr(args, "preview", None) or pipe is None:
        return None
    from ldm.preview import PreviewFile, previewer
    return PreviewFile(previewer(pipe, args.preview_vae), out.root / "preview.png",
                       args.preview)


def stepper(bar, preview=None):
    """The sampling callback of the scripts: one step on ``bar``, the preview updated."""
    def step(i, x, x0):
        bar.update()
        if preview is not None:
            preview(x0)
    return step


def _batches(args, out, work, make, step, bar):
    """``generate_batches``' loop: each batch made and its samples saved at once."""
    done = []
    for prompts, seeds, *extra in work:
        samples = make(prompts, seeds, step, *extra)
        for s in samples:
            if getattr(args, "fixed_code", False):
                s.parameters["fixed_code"] = True
            if not args.skip_save:
                out.save_numbered(s.image, "{:05}.png", s.parameters, "samples")
        done.extend(samples)
        bar.set_postfix_str(plural(len(done), "image"))
    return done


def add_job_arguments(p):
    """--shard, --overwrite and the worker flags, for scripts that run JSONL jobs."""
    from ldm.jobs import parse_shard

    def shard(text):
        try:
            return parse_shard(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    p.add_argument("--shard", type=shard, default=None, metavar="I/N",
                   help="JSONL jobs: run every N-th batch from the I-th only (array jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="JSONL jobs: replace the images of another job in --outdir")
    add_worker_arguments(p)


class JobRun:
    """A JSONL job ready to run: this process's batches, each line's sampling, the
    manifest (read, not yet written), the indices of the images the job (or its shard)
    holds, the shard and the Fabric (None for one process)."""

    def __init__(self, args, work, sampling, manifest, ks, shard, fabric):
        self.args, self.work, self.sampling = args, work, sampling
        self.manifest, self.ks, self.shard, self.fabric = manifest, ks, shard, fabric

    def run(self, out, steps, make):
        """The job, once the model is loaded: the manifest opened for appending (rank 0
        first: it starts the manifest), then ``run_job``."""
        try:
            if self.fabric is None:
                self.manifest.open()
                if self.manifest.started:
                    out.written.append(self.manifest.path)
            else:
                if self.fabric.global_rank == 0:
                    self.manifest.open()
                self.fabric.barrier()
                if self.fabric.global_rank != 0:
                    self.manifest.overwrite = False  # rank 0 started it afresh if asked
                    self.manifest.open()
            return run_job(self.args, out, self.manifest, self.work, steps, make, self.shard,
                           self.fabric, self.ks)
        finally:
            self.manifest.close()


def prepare_job(args, choice, extra_fingerprint="", size=None):
    """For a JSONL --from-file: every line checked, the images planned and batched, the
    workers started (``--devices``, torchrun, SLURM) and the manifest read (the folder
    checked; nothing written), all before the model loads. None for any other run (whose job-only flags are
    then refused)."""
    from ldm import jobs
    if getattr(args, "threads", None):
        import_torch()
        import torch
        torch.set_num_threads(args.threads)
    requests = read_job(args)
    if not requests:
        if args.shard or args.overwrite or args.devices is not None or args.num_nodes > 1:
            hint = ""
            if args.from_file:
                jsonl = Path(args.from_file).with_suffix(".jsonl")
                hint = (f"; to make one: jq -Rc 'select(test(\"\\\\S\")) | {{prompt: .}}' "
                        f"{args.from_file} > {jsonl}")
            raise UsageError("--shard, --overwrite, --devices and --num_nodes are for "
                             f"JSONL prompt files (--from-file prompts.jsonl){hint}")
        return None
    sampling = check_requests(args, choice, requests, size)
    images = jobs.plan(requests, args.seed)
    work = jobs.indexed_batches(images, args, args.n_samples)
    shard = args.shard
    from ldm.image_io import Outputs
    Outputs(args.outdir).check()
    fabric = jobs.start_workers(args) if jobs.distributed_requested(args) else None
    manifest = jobs.Manifest(args.outdir, jobs.fingerprint(args.from_file, args,
                                                           extra_fingerprint),
                             len(images), args.overwrite,
                             jobs.job_settings(args.from_file, args, extra_fingerprint))
    manifest.read()  # a folder of another job refused now; nothing written before the load
    mine = work if shard is None else work[shard[0]::shard[1]]
    ks = [k for batch in mine for k in batch[3]]
    if fabric is not None:
        become_worker(args, fabric)
        work, shard = mine[fabric.global_rank::fabric.world_size], None
    return JobRun(args, work, sampling, manifest, ks, shard, fabric)


def add_worker_arguments(p):
    g = p.add_argument_group("workers (JSONL jobs; PyTorch Lightning's meaning)")
    g.add_argument("--devices", default=None,
                   help="processes per machine: a number, a list of GPU ids, or auto "
                        "(default: one process, no torch.distributed)")
    g.add_argument("--num_nodes", type=number(int, 1), default=1, help="machines")
    g.add_argument("--strategy", default="auto", help="e.g. ddp (Lightning's strategies)")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu, cuda, mps or auto")
    g.add_argument("--threads", type=number(int, 1), default=None,
                   help="CPU threads per process (default: all cores, shared among this "
                        "machine's workers); the count changes float rounding, so jobs "
                        "meant to match byte for byte use the same threads per process")


def become_worker(args, fabric):
    """This process's part of a job: its device, and quiet unless it is rank 0."""
    args.device = str(fabric.device)
    if fabric.global_rank != 0:
        logging.getLogger().setLevel(logging.ERROR)
        log.setLevel(logging.ERROR)
        args.quiet_worker = True


def run_job(args, out, manifest, work, steps_per_batch, make, shard=None, fabric=None,
            ks=None):
    """A JSONL job: the batches of ``work`` ([(prompts, seeds, request, ks)]; this shard's
    share, ``(i, n)``: every n-th batch from the i-th), skipping images the manifest has,
    each new one saved as OUTDIR/samples/<k>.png and then recorded. A batch with any image
    missing is run whole, so each image is computed in the batch it always is. One bar
    (rank 0's) counts the images of the whole job, ``ks`` (default: this process's),
    other workers' as they reach the manifest. Returns (images made, images skipped)."""
    from ldm.image_io import save_png
    from ldm.jobs import GRID_LIMIT, file_name
    from ldm.util import interrupts_deferred
    from ldm.progress import progress
    start = time.perf_counter()
    mine = work if shard is None else work[shard[0]::shard[1]]
    total = manifest.total
    made = []
    todo = [b for b in mine if not all(manifest.finished(k) for k in b[3])]
    skipped = sum(len(b[3]) for b in mine) - sum(len(b[3]) for b in todo)
    if skipped:
        log.info("%d of this job's %d images are done already (%s): skipping them",
                 skipped, sum(len(b[3]) for b in mine), manifest.path)
    samples = manifest.folder / "samples"
    quiet = getattr(args, "quiet_worker", False)
    job = _JobCount(manifest, [k for b in mine for k in b[3]] if ks is None else ks)
    with progress(len(job.ks), "images", unit="image", initial=job.count(),
                  disable=quiet) as bar:
        job.bar = bar
        for i, (prompts, seeds, request, batch_ks) in enumerate(todo, start=1):
            steps, step = steps_per_batch((prompts, seeds, request, batch_ks)), [0]

            def callback(*_):
                step[0] += 1
                bar.set_postfix_str(f"batch {i}/{len(todo)}, step {step[0]}/{steps}")
                job.poll()
            results = make(prompts, seeds, callback, request)
            samples.mkdir(parents=True, exist_ok=True)
            for k, s in zip(batch_ks, results):
                if manifest.finished(k):
                    continue
                name = f"samples/{file_name(k, total)}"
                path = manifest.folder / name
                with interrupts_deferred():  # the PNG and its manifest line, or neither
                    if path.exists() and manifest.overwrite:
                        path.unlink()
                    if not path.exists():  # else: whole (linked in place) from a killed run
                        save_png(s.image, path, {**s.parameters, "index": k})
                        out.written.append(path)
                    manifest.record(k, name, s.parameters["seed"], s.parameters["prompt"])
                made.append(s)
            job.poll(force=True)
        new, before, workers = len(made), skipped, 1
        if fabric is not None:  # every worker's counts, once all are done
            new, before = _sum_over_workers(fabric, [new, before], job.poll)
            workers = fabric.world_size
        job.poll(force=True)
    if fabric is not None and fabric.global_rank != 0:
        return made, skipped
    if made and not args.skip_grid and total <= GRID_LIMIT and len(made) == total \
            and len({s.image.size for s in made}) == 1:
        from ldm.image_io import make_grid
        out.save_numbered(make_grid([s.image for s in made], args.n_rows or args.n_samples),
                          "grid-{:04}.png", {"grid_of": [s.parameters for s in made]})
    elif made and not args.skip_grid and total > GRID_LIMIT:
        log.info("no grid: a job of more than %d images writes none", GRID_LIMIT)
    seconds = time.perf_counter() - start
    rate = f", {new / seconds / workers:.2f} images/s per worker" if new and seconds else ""
    print(f"{plural(new, 'new image')} ({before} done before) in {seconds:.1f} s with "
          f"{plural(workers, 'worker')}{rate}: {samples}")
    return made, skipped


class _JobCount:
    """The job's finished images for its bar: this worker's as it records them, the
    others' read from the manifest at most once a second."""

    def __init__(self, manifest, ks):
        self.manifest, self.ks, self.bar, self.last = manifest, set(ks), None, 0.0

    def count(self):
        return sum(1 for k in self.ks if self.manifest.finished(k))

    def poll(self, force=False):
        now = time.monotonic()
        if not force and now - self.last < 1.0:
            return
        self.last = now
        self.manifest.refresh()
        done = sum(1 for k in self.manifest.done if k in self.ks)
        if self.bar is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)


def _sum_over_workers(fabric, values, wait):
    """``values`` summed over every worker (ints); ``wait()`` is called about twice a
    second until the slowest worker is done."""
    import torch
    import torch.distributed as dist
    tensor = torch.tensor(values, dtype=torch.int64, device=fabric.device)
    if not (dist.is_available() and dist.is_initialized()):
        tensor = fabric.all_reduce(tensor, reduce_op="sum")
    else:
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        while not work.is_completed():
            wait()
            time.sleep(0.5)
        work.wait()
    return [int(v) for v in tensor.cpu().tolist()]


# ----------------------------------------------------------------------------- the model

def import_torch():
    """Import torch with Ctrl-C and SIGTERM held until it is done: an interrupt raised
    inside torch's C++ start-up (a pybind11 callback) aborts the process instead of
    ending it in one line."""
    from ldm.util import interrupts_deferred
    with interrupts_deferred():
        import torch  # noqa: F401


def choose_model(args, task="txt2img"):
    """The model a run will load, resolved and checked without reading weights (or
    importing torch, given a config): a ``ldm.config.ModelChoice``."""
    from dataclasses import replace
    from ldm.config import choose_model as choose
    if args.config is None:
        import_torch()  # the checkpoint may be opened to see its UNet's input channels
    choice = choose(args.ckpt, args.config, task)
    # a few-step distillate's UNet or LoRA sets the sampling defaults the flags complete
    unet = getattr(args, "unet", None)
    return replace(choice, unet=Path(unet) if unet else None,
                   loras=tuple(Path(path) for path, _ in getattr(args, "lora", None) or ()))


def check_safety_checker(args):
    if args.safety_checker not in (None, "none") and not Path(args.safety_checker).exists():
        raise InputError(f"--safety_checker {args.safety_checker} not found: give its "
                         "weights file or folder, or 'none'")


def load_pipeline(args, choice):
    """Device, then the weights (the slow part), then one line saying what is used."""
    import_torch()
    from ldm.config import INPAINTING_HINT, INSTALL_HINT
    from ldm.pipeline import Pipeline, check_compiler, pick_device
    device = pick_device(args.device)
    if args.offload and device.type == "cpu":
        raise UsageError("--offload moves submodels between the CPU and a GPU: it needs "
                         "--device cuda (on the CPU there is nothing to offload)")
    if args.compile:
        check_compiler(device)
        log.info("--compile: the UNet is compiled at its first step (a few minutes on a CPU)")
    pipe = Pipeline.load(choice, device=device, precision=args.precision,
                         safety=args.safety_checker != "none",
                         safety_checker_path=args.safety_checker, offload=args.offload,
                         vae=args.vae, backend="torch",   # chosen with the other options below
                         text_encoders={k: getattr(args, k) for k in
                                        ("clip_l", "clip_g", "t5xxl", "t5_tokenizer")})
    pipe.set_loras(args.lora)
    for path, token in args.embedding:
        pipe.load_embedding(path, token)
    pipe.set_text_options(clip_skip=args.clip_skip, prompt_syntax=args.prompt_syntax,
                          t5_length=args.t5_length)
    pipe.set_options(compile=args.compile, deepcache=args.deepcache,
                     attention_slicing=args.attention_slicing, vae_tiling=args.vae_tiling,
                     backend=args.backend or DEFAULT_BACKEND)
    if getattr(args, "control", None):
        pipe.set_controls(control_units(args, pipe))
    if getattr(args, "refiner", None):
        from ldm.config import choose_model
        try:
            refiner_choice = choose_model(args.refiner, args.refiner_config)
        except InputError as e:   # worded for --ckpt: say which flag
            raise type(e)(str(e).replace("--ckpt", "--refiner")) from None
        refiner = Pipeline.load(refiner_choice,
                                device=device, precision=args.precision, safety=False,
                                watermark=False, backend=args.backend or DEFAULT_BACKEND)
        switch = 0.8 if args.refiner_switch is None else args.refiner_switch
        pipe.set_refiner(refiner, switch)
        log.info("refining the last %g of each schedule with %s", round(1 - switch, 6),
                 refiner.model_name)
    inpainting = choice.geometry.is_inpainting
    hint = ("" if args.ckpt or not choice.builtin else
            f"; {INPAINTING_HINT if inpainting else INSTALL_HINT}")
    log.info("using %s on %s%s", pipe.model_name, pipe.device, hint)
    return pipe


def control_units(args, pipe):
    """--control and its companions as ``ldm.controlnet.ControlUnit``s for ``pipe``."""
    from ldm.controlnet import ControlUnit, load_controlnet, preprocess
    from ldm.image_io import load_image
    n = len(args.control)
    specs = args.control_preprocess + ["none"] * n
    modes = args.control_mode + ["balanced"] * n
    weights = args.control_weight + [1.0] * n
    starts, ends = args.control_start + [0.0] * n, args.control_end + [1.0] * n
    units = []
    for i, (path, image) in enumerate(zip(args.control, args.control_image)):
        try:
            picture = load_image(image, "--control_image")
        except LdmError as e:
            raise type(e)(f"--control_image: {e}") from None
        net = load_controlnet(path, pipe.model)
        units.append(ControlUnit(net, preprocess(picture, specs[i]), weights[i], starts[i],
                                 ends[i], name=Path(path).name, preprocess=specs[i],
                                 mode="balanced" if modes[i] == "guess" else modes[i],
                                 guess=modes[i] == "guess"))
    return units


def resolve_sampling(args, info=None, task="txt2img"):
    """--sampler / --plms / --schedule / --ddim_eta / --ddim_steps checked with the model's
    defaults (``ldm.request.sampling``, in flag words) and written back resolved:
    args.sampler (an id), args.schedule, args.ddim_eta, args.ddim_steps. ``info``: the
    model's ``ModelInfo`` (None: SD's defaults). Returns the guidance scale."""
    info = info or req.ModelInfo(8, 512)
    name = getattr(args, "sampler", None)
    if args.plms:
        if name is not None and req.resolve_sampling(name, None, None, names_of(FLAGS))[0] != "plms":
            raise UsageError(f"--plms and --sampler {name!r} disagree: drop one")
        name = "plms"
    values = req.sampling(task, info, bool(getattr(args, "negative_prompt", "")), name,
                          getattr(args, "schedule", None), args.ddim_eta,
                          getattr(args, "ddim_steps", None), getattr(args, "scale", None),
                          FLAGS)
    args.sampler, args.schedule, args.ddim_eta = (values["sampler"], values["schedule"],
                                                  values["eta"])
    args.ddim_steps = values["steps"]
    return values["scale"]


def names_of(names):
    return lambda key: names.get(key, key)


def check_sampling(args, choice, task="txt2img"):
    """The sampling flags against each other and the model's config; the guidance scale.
    A dedicated inpainting model (9-channel UNet) serves inpainting only."""
    g = choice.geometry
    if (task == "upscale") != g.upscaler:
        raise UsageError(f"{choice.ckpt} is the SD x4 upscaler: use scripts/upscale.py (or "
                         "--hr_upscaler with scripts/txt2img.py)" if g.upscaler else
                         "upscaling needs the SD x4 upscaler (x4-upscaler-ema) as --ckpt")
    if task != "inpaint" and g.is_inpainting:
        raise UsageError(f"{choice.ckpt} is an inpainting model ({g.unet_in_channels}-channel "
                         "UNet): use scripts/inpaint.py")
    if task == "txt2img" and g.refiner:
        raise UsageError(f"{choice.ckpt} is SDXL's refiner: it refines images "
                         f"(scripts/img2img.py, --strength about 0.3) or the last steps of a "
                         f"base (--refiner {Path(choice.ckpt).name} beside --ckpt of a base)")
    if args.skip_save and args.skip_grid:
        raise UsageError("--skip_save with --skip_grid would write nothing: drop one")
    if not g.flow:
        for flag in ("clip_l", "clip_g", "t5xxl", "t5_tokenizer", "t5_length"):
            if getattr(args, flag, None):
                raise UsageError(f"--{flag} is for SD 3 models; {choice.ckpt} is not one: "
                                 "drop it")
    else:   # what SD 3 does not take, said before the load
        for flag, given in (("--prompt-syntax a1111", args.prompt_syntax == "a1111"),
                            ("--embedding", args.embedding),
                            ("--deepcache", (args.deepcache or 1) > 1),
                            ("--backend openvino", args.backend == "openvino"),
                            ("--control", getattr(args, "control", None))):
            if given:
                raise UsageError(f"{flag} is not supported for SD 3 here: drop it")
    return resolve_sampling(args, req.ModelInfo.of_choice(choice), task)


def build_request(args, info, task, prompts, seeds, **values):
    """The ``Request`` of one batch, from the flags (``values`` override them: a JSONL
    line's settings, the image and mask), in flag words."""
    fields = dict(negative_prompts=args.negative_prompt, sampler=args.sampler,
                  schedule=args.schedule, eta=args.ddim_eta, steps=args.ddim_steps,
                  scale=args.scale, height=getattr(args, "H", None),
                  width=getattr(args, "W", None), rescale=getattr(args, "rescale", None),
                  slg=getattr(args, "slg", None),
                  **{k: getattr(args, k, None) for k in req.SIZE_CONDITIONING})
    if task in ("img2img", "inpaint"):
        fields.update(strength=args.strength, resize_mode=args.resize_mode,
                      full_size=args.full_size)
    fields.update(values)
    if isinstance(fields.get("hires"), dict):
        from ldm.hires import Hires
        fields["hires"] = Hires.build(**fields["hires"], names=FLAGS)
    return req.Request.build(task, info, prompts, seeds, names=FLAGS, **fields)


def check_size(geometry, height, width, batch, device_name="auto", vae_tile=None):
    """A size the model takes (multiples of its factor) and that fits in memory. (A config
    that does not say its sizes is checked after the load, by the pipeline.)"""
    if height is None or width is None:
        return
    f = geometry.factor
    if f and (height % f or width % f):
        raise UsageError(f"--H and --W must be positive multiples of {f} for this model "
                         f"(got {height}x{width}); e.g. {geometry.native_size}")
    req.check_memory(geometry, height, width, batch, device_name, vae_tile, FLAGS)
    req.check_work(geometry, height, width, vae_tile, FLAGS)


# ----------------------------------------------------------------------------- running


class Job:
    """What a run has written so far (for the last line, whatever ends the run)."""

    def __init__(self):
        self.outputs = []

    def track(self, outputs):
        self.outputs.append(outputs)
        return outputs

    def outdir(self, folder):
        """The run's output folder (``ldm.image_io.Outputs``), checked without creating it,
        and tracked. A folder named like an image file (``--outdir out.png``) is said in one
        line: it becomes a folder, and the images go inside it."""
        from ldm.image_io import Outputs
        if Path(folder).suffix.lower() in IMAGE_SUFFIXES and not Path(folder).is_dir():
            log.warning("--outdir %s names a folder (the images go inside it), though it "
                        "looks like a file name", folder)
        return self.track(Outputs(folder).check())

    @property
    def written(self):
        return [p for o in self.outputs for p in o.written]

    def summary(self):
        files = self.written
        if not files:
            return "nothing was written"
        images = [p for p in files if p.suffix == ".png"]
        if not images:  # a JSONL job's manifest, started
            return (f"no image was finished ({', '.join(str(p) for p in files)} started: a "
                    "rerun resumes the job)")
        folders = sorted({str(p.parent) for p in images})
        return f"{plural(len(images), 'finished file')} kept in {', '.join(folders)}"


class _OncePerRun(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def filter(self, record):
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _ProgressHandler(logging.Handler):
    """Writes through ``ldm.progress.write`` (above any bar) to the current sys.stderr."""

    def emit(self, record):
        try:
            from ldm.progress import write
            write(self.format(record))
        except Exception:  # a logging failure must not end the run
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _install_logging():
    handler = _ProgressHandler(logging.INFO)
    handler.setFormatter(_Format())
    handler.addFilter(_OncePerRun())
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.INFO)  # the run's own lines ("using ...", a drawn seed)
    logging.captureWarnings(True)  # a library's warnings.warn reads like our messages, once
    return saved


def _restore_logging(saved):
    root = logging.getLogger()
    root.handlers[:], level = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def _say(line):
    print(line, file=sys.stderr, flush=True)


def main(build_parser, run, argv=None):
    """Parse, run, and turn whatever ends the run into one line and an exit status."""
    from ldm.util import InterruptWatchdog
    job, saved, interrupted = Job(), None, False
    previous_handler = signal.getsignal(signal.SIGINT)
    previous_term = signal.getsignal(signal.SIGTERM)
    # an interrupt that a long call into C++ holds ends the process all the same
    watchdog = InterruptWatchdog(lambda signum: _stop_line(signum == signal.SIGTERM, job),
                                 lambda signum: TERMINATED if signum == signal.SIGTERM
                                 else INTERRUPTED)
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)  # a job scheduler's stop: as Ctrl-C
        watchdog.start()
        saved = _install_logging()
        args = build_parser().parse_args(argv)
        run(args, job)
        return 0
    except KeyboardInterrupt as e:
        watchdog.handled()
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: still one line
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say(_stop_line(isinstance(e, Terminated), job))
        return TERMINATED if isinstance(e, Terminated) else INTERRUPTED
    except LdmError as e:
        _say(f"error: {e}")
        return e.exit_status
    except MemoryError:
        _say("error: out of memory: lower --H/--W or --n_samples")
        return ResourceError.exit_status
    except RuntimeError as e:
        if not _is_out_of_memory(e):
            raise
        _say(f"error: out of memory ({_allocation(e)}): lower --H/--W or --n_samples")
        return ResourceError.exit_status
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        _say(f"error: {e.strerror or e}{where}")
        return 1
    finally:
        watchdog.stop()
        # after an interrupt the process is ending: the handlers stay ignoring, so that a
        # second Ctrl-C on the way out cannot turn the clean exit into a traceback or a
        # death by signal
        if threading.current_thread() is threading.main_thread() and not interrupted:
            signal.signal(signal.SIGINT, previous_handler)
            signal.signal(signal.SIGTERM, previous_term)
        if saved is not None:
            _restore_logging(saved)


def _stop_line(terminated, job):
    return f"{'terminated' if terminated else 'interrupted'}: {job.summary()}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), handled as Ctrl-C is."""


def _terminate(signum, frame):
    raise Terminated()


def _is_out_of_memory(e):
    text = str(e)
    return ("can't allocate memory" in text or "out of memory" in text.lower()
            or type(e).__name__ == "OutOfMemoryError")


def _allocation(e):
    import re
    m = re.search(r"allocate (\d+) bytes", str(e))
    if m:
        return f"an allocation of {int(m.group(1)) / 2**30:.1f} GiB failed"
    return "the GPU's memory is full" if "CUDA" in str(e) else "an allocation failed"
