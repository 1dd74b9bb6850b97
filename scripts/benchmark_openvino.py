"""Ours on torch and on OpenVINO against optimum-intel's OVStableDiffusionPipeline, the
same random SD v1.5-shaped weights, sampler, noise and threads, alternating round by round.

    python scripts/benchmark_openvino.py --sizes 256,512 --precisions f32 \
        --peer-python ~/.cache/ov-peer/bin/python

The weights: a random SD v1 checkpoint and its diffusers folder (``benchmark_memory.
make_weights``); both of ours load the folder, so all three hold the same float32 weights.
The peer runs in its own process (``--peer-python``: an environment with optimum-intel,
which pins older transformers/diffusers than ours; see docs/openvino.md), exports the folder
to OpenVINO IR itself (``export=True``), reshapes to static shapes and compiles; it is
driven over a pipe so that its rounds alternate with ours. Euler on the model's own
timesteps (diffusers' Karras sigmas span the spaced timesteps, ours the training range, so
Euler Karras would be two different schedules), guidance 7.5, the same starting noise
(ours, given to the peer as ``latents``).

Per step: (t(10 steps) - t(2 steps)) / 8, whole images prompt to pixels (no safety checker,
no watermark); medians over rounds. Fidelity: PSNR of the 10-step images against ours on
torch. Conversion: ours converts on the first call (a fresh cache folder), the peer exports
in ``from_pretrained``; "cached start" is a new pipeline's first 2-step image with the IR
on disk, less a warm one.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PROMPT = "a photograph of an astronaut riding a horse"
PEER = r"""
import json, sys, time, resource
import numpy as np, torch
from diffusers import EulerDiscreteScheduler
from optimum.intel.openvino.modeling_diffusion import OVStableDiffusionPipeline
folder, size, precision, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(int(threads))
start = time.perf_counter()
pipe = OVStableDiffusionPipeline.from_pretrained(
    folder, export=True, compile=False, safety_checker=None,
    ov_config={"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
               "INFERENCE_NUM_THREADS": threads})
exported = time.perf_counter() - start
pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
pipe.compile()
compiled = time.perf_counter() - start - exported
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
print(json.dumps({"export_s": exported, "compile_s": compiled}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    latents = torch.from_numpy(np.load(cmd["noise"]))
    t = time.perf_counter()
    image = pipe(cmd["prompt"], num_inference_steps=cmd["steps"], guidance_scale=7.5,
                 height=size, width=size, latents=latents, output_type="np").images[0]
    seconds = time.perf_counter() - t
    if cmd.get("save"):
        np.save(cmd["save"], image)
    print(json.dumps({"s": seconds,
                      "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
          flush=True)
"""


class Peer:
    def __init__(self, python, folder, size, precision, threads):
        self.proc = subprocess.Popen([python, "-c", PEER, str(folder), str(size), precision,
                                      str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.setup = self.read()

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            sys.exit("the optimum-intel process ended (its messages are above)")
        return json.loads(line)

    def run(self, steps, noise, save=None):
        self.proc.stdin.write(json.dumps({"prompt": PROMPT, "steps": steps, "noise": str(noise),
                                          "save": str(save) if save else None}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def legacy_text_keys(folder):
    """The folder's text encoder under ``text_model.`` keys, as transformers 4 saved them
    (the hub's SD folders hold that form): the peer's transformers 4.x reads only that,
    ours and transformers 5 read both."""
    from safetensors.torch import load_file, save_file
    for path in (folder / "text_encoder").glob("*.safetensors"):
        sd = load_file(path)
        if not any(k.startswith("text_model.") for k in sd):
            save_file({("text_model." + k): v for k, v in sd.items()}, path,
                      metadata={"format": "pt"})


def psnr(a, b):
    import numpy as np
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256")
    p.add_argument("--precisions", default="f32", help="f32 and/or bf16 (OpenVINO's hint; "
                   "torch: --precision full / bf16)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", default="2,10", help="the two step counts of the per-step time")
    p.add_argument("--peer-python", default=str(Path.home() / ".cache/ov-peer/bin/python"),
                   help="a Python with optimum-intel; 'none' to leave the peer out")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "sd-bench")
    p.add_argument("--no-torch", action="store_true",
                   help="leave ours on torch out of the rounds (512x512 with the peer beside "
                        "it needs more than 24 GiB otherwise; the torch figures come from "
                        "scripts/benchmark.py)")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from benchmark import cpu_name
    from benchmark_memory import make_weights
    from ldm.pipeline import Pipeline
    threads = torch.get_num_threads()
    lo, hi = map(int, args.steps.split(","))
    _, folder = make_weights(args.cache)
    legacy_text_keys(folder)
    print(f"{cpu_name()}, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {threads} threads", flush=True)
    rows = []
    for size in map(int, args.sizes.split(",")):
        for precision in args.precisions.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                os.environ["LDM_OPENVINO_CACHE"] = str(Path(tmp) / "ov-cache")
                rows += run_size(args, folder, size, precision, threads, lo, hi, Path(tmp),
                                 np, Pipeline)
    print("\nsummary (medians; ratio: ours on OpenVINO / optimum-intel, < 1: ours faster)")
    for row in rows:
        print(row)


def run_size(args, folder, size, precision, threads, lo, hi, tmp, np, Pipeline):
    torch_precision = "full" if precision == "f32" else "bf16"
    peer = None
    if args.peer_python != "none":
        peer = Peer(args.peer_python, folder, size, precision, threads)
    pipe = Pipeline.load(folder, device="cpu", precision=torch_precision, safety=False,
                         watermark=False, backend="torch")
    noise, _ = pipe.initial_noise([0], size, size)
    np.save(tmp / "noise.npy", noise.numpy())
    kw = dict(sampler="euler", scale=7.5, height=size, width=size, progress=False)

    def ours(backend, steps):
        pipe.set_options(backend=backend)
        start = time.perf_counter()
        image = pipe.generate(PROMPT, [0], steps=steps, **kw)[0].image
        return time.perf_counter() - start, image

    first, _ = ours("openvino", lo)
    converted = first - ours("openvino", lo)[0]
    engines = ("openvino",) if args.no_torch else ("torch", "openvino")
    if not args.no_torch:
        ours("torch", lo)
    if peer:
        peer.run(lo, tmp / "noise.npy")
    times = {name: {lo: [], hi: []} for name in ("torch", "openvino", "optimum-intel")}
    images = {}
    for _ in range(args.rounds):
        for steps in (lo, hi):
            for name in engines:
                seconds, image = ours(name, steps)
                times[name][steps].append(seconds)
                images[name] = image
            if peer:
                out = peer.run(steps, tmp / "noise.npy", tmp / "peer.npy")
                times["optimum-intel"][steps].append(out["s"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # a new pipeline on the same IR: the start a second run of this size has (the first
    # one freed before: two SD pipelines with OpenVINO copies do not fit 24 GiB at 512)
    del pipe
    import gc
    gc.collect()
    again = Pipeline.load(folder, device="cpu", precision=torch_precision, safety=False,
                          watermark=False, backend="torch")
    again.set_options(backend="openvino")
    start = time.perf_counter()
    again.generate(PROMPT, [0], steps=lo, **kw)
    cached = time.perf_counter() - start - statistics.median(times["openvino"][lo])
    del again
    rows = []
    label = f"{size}x{size} {precision}"
    per_step = {n: (statistics.median(t[hi]) - statistics.median(t[lo])) / (hi - lo)
                for n, t in times.items() if t[hi]}
    whole = {n: statistics.median(t[hi]) for n, t in times.items() if t[hi]}
    def ratios(t):
        if not peer:
            return ""
        out = f"  ratio {t['openvino'] / t['optimum-intel']:.2f}"
        return out + (f" (torch {t['torch'] / t['optimum-intel']:.2f})" if "torch" in t else "")
    line = "  ".join(f"{n} {per_step[n]:.2f} s" for n in per_step)
    rows.append(f"per step   {label}: {line}{ratios(per_step)}")
    line = "  ".join(f"{n} {whole[n]:.1f} s" for n in whole)
    rows.append(f"{hi}-step image {label}: {line}{ratios(whole)}")
    rows.append(f"start      {label}: ours converts in {converted:.0f} s, starts from its "
                f"cache in +{cached:.1f} s"
                + (f"; optimum-intel exports in {peer.setup['export_s']:.0f} s and compiles in "
                   f"{peer.setup['compile_s']:.0f} s" if peer else ""))
    reference = "torch" if "torch" in images else "openvino"
    fidelity = (f"ours OpenVINO vs torch {psnr(images['openvino'], images['torch']):.1f} dB, "
                if reference == "torch" else "")
    if peer:
        theirs = (np.load(tmp / "peer.npy") * 255).round().clip(0, 255).astype(np.uint8)
        fidelity += (f"optimum-intel vs ours {reference} "
                     f"{psnr(theirs, images[reference]):.1f} dB")
        peer_rss = peer.run(lo, tmp / "noise.npy")["rss_gib"]
        peer.close()
        rows.append(f"memory     {label}: ours (torch weights and OpenVINO in one process) peak RSS "
                    f"{rss:.2f} GiB, optimum-intel {peer_rss:.2f} GiB")
    rows.append(f"fidelity   {label}: {fidelity}")
    for row in rows:
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
