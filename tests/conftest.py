"""Shared fixtures: the tiny SD-v1-architecture model with seeded random weights."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "tiny-inference.yaml"
V1_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"


def rel_err(a, b):
    """max |a - b| / max |b|; printed, so `pytest -s` reports the figures."""
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"\n  max rel err {err:.1e}", end=" ")
    return err


def randomize(model, seed=0):
    """Give every parameter seeded non-trivial values (zero-initialised output layers would
    make cross-checks vacuous): norms near 1, everything else ~ N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() <= 1:  # biases, OpenCLIP's scalar logit_scale
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def build_tiny(seed=0):
    config = OmegaConf.load(TINY_CONFIG)
    return randomize(instantiate_from_config(config.model), seed).eval()


def official_layout(model, dtype=torch.float32):
    """What a CompVis training run saves: weights, schedule buffers, EMA, position_ids."""
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    sd["alphas_cumprod"] = model.alphas_cumprod.clone()
    sd["betas"] = model.betas.clone()
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(100)
    sd["model_ema.diffusion_modelout0weight"] = torch.ones(3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return sd


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny()


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_CONFIG)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tiny_model):
    """The tiny model saved as CompVis saves SD: a Lightning .ckpt (fp32) and a
    .safetensors (fp16)."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("ckpt")
    sd = official_layout(tiny_model)
    ckpt = folder / "tiny.ckpt"
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, ckpt)
    st = folder / "tiny.safetensors"
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in sd.items()}, st)
    return {"ckpt": ckpt, "safetensors": st}


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A script's main() that was interrupted leaves Ctrl-C ignored (its process is
    ending); in this process the next test gets the handlers back."""
    import signal
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def network_outputs(model, pipe):
    """(ours, theirs): the UNet's prediction and the text encoder's output of our ``model``
    and of a diffusers ``pipe`` on the same seeded inputs (any SD 1/2 width)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([901, 11])
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    ids = model.cond_stage_model.tokenize(["a red circle", "two squares"], 77)
    with torch.no_grad():
        ours = (model.apply_model(x, t, ctx), model.cond_stage_model.encode_ids(ids))
        theirs = (pipe.unet(x, t, encoder_hidden_states=ctx).sample,
                  pipe.text_encoder(ids).last_hidden_state)
    return ours, theirs


def diffusers_named_lora(nets, rank=4, alpha=2.0, seed=0, peft=False):
    """A random LoRA named from diffusers' own modules, as kohya's sd-scripts write them:
    the UNet's attention, feed-forward, projections and ResBlock convolutions, every Linear
    of the text encoders' layers (q/k/v apart). ``nets``: [(kohya prefix, PEFT component
    prefix, module, name root)], e.g. ("lora_te_", "text_encoder.", clip, "text_model.").
    ``peft``: the same layers in diffusers' PEFT form (``<component><module>.lora_A``),
    alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, component, net, root in nets:
        unet = prefix == "lora_unet_"
        for name, m in net.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if unet and not (any(s in name for s in (
                    "to_q", "to_k", "to_v", "to_out", "ff.net", "proj_in", "proj_out"))
                    or (isinstance(m, torch.nn.Conv2d) and "resnets" in name
                        and "shortcut" not in name)):
                continue
            if not unet and "layers" not in name:
                continue
            name = name if name.startswith(root) else root + name
            w = m.weight
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
            up = torch.randn(w.shape[0], rank, *(1,) * (w.dim() - 2), generator=g) * 0.3
            if peft:
                key = component + name
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = down, up
                continue
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def run_here(script, *args, cwd=None):
    """``scripts/<script>`` run by its ``main()`` in this process, as a finished process
    reads (``returncode``, ``stdout``, ``stderr``): what a subprocess would print and exit
    with, without starting Python and importing torch again (seconds a call). ``cwd`` is the
    working folder and the Hugging Face cache (none found there) for the call. A script's
    own guard (``sys.exit(main())``) is the one line not exercised: a few tests keep a real
    process for it."""
    import contextlib
    import importlib
    import io
    import os
    import subprocess
    import sys
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    module = importlib.import_module(Path(script).stem)
    out, err = io.StringIO(), io.StringIO()
    where, env = os.getcwd(), dict(os.environ)
    os.environ.update(HF_HOME=str(cwd or "/nonexistent"), HF_HUB_CACHE=str(cwd or "/nonexistent"))
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main([str(a) for a in args])
            except SystemExit as e:   # argparse's usage errors
                code = e.code
    finally:
        os.chdir(where)
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess([script, *map(str, args)], code or 0, out.getvalue(),
                                       err.getvalue())


def write_tiny_t5_tokenizer(folder, vocab_size=320):
    """A tiny SentencePiece-style Unigram tokenizer in T5's form (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, metaspace pre-tokenisation), as ``folder/tokenizer.json``: T5's own
    vocabulary does not ship here. Pieces: common words, single characters, then fillers
    up to ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'&;:-()"
    words = ("a photo of cat dog red blue green circle square tree two three in the on with "
             "and painting house sky sun moon river mountain city night").split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - i * 0.01) for i, w in enumerate(words)]
    pieces += [(w, -6.0 - i * 0.01) for i, w in enumerate(words)]
    pieces += [("\u2581", -5.0)] + [(c, -8.0 - i * 0.01) for i, c in enumerate(chars)]
    pieces = (pieces + [(f"<fill_{i}>", -30.0) for i in range(vocab_size)])[:vocab_size]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.save(str(folder / "tokenizer.json"))
    return folder
