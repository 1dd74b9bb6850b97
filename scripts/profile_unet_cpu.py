"""Where one SD v1 UNet step spends its time on the CPU: our torch module (torch.profiler,
by operator) against the same module converted to OpenVINO (its own performance counters,
by layer type and kernel), on identical random weights, one step at a time, alternating.

    python scripts/profile_unet_cpu.py --size 256            # batch 2 (one image, guidance)
    python scripts/profile_unet_cpu.py --size 256 --compile_openvino   # + torch.compile's path
    python scripts/profile_unet_cpu.py --layouts       # torch's convolution layouts alone

Both sides are grouped into the same few kinds (convolution, linear/matmul, attention,
normalisation, elementwise and the rest) so that the step's difference shows where it
comes from. ``--compile_openvino`` also times ``torch.compile(backend="openvino")`` on the
same module (the other way issue 43 names to reach OpenVINO), against ``convert_model``.
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# torch operators and OpenVINO layer types, each to one kind
TORCH_KINDS = {"conv": ("conv",), "linear/matmul": ("addmm", "mm", "bmm", "matmul", "linear",
                                                    "baddbmm"),
               "attention": ("scaled_dot_product", "flash_attention", "softmax"),
               "normalisation": ("group_norm", "layer_norm", "native_group_norm",
                                 "native_layer_norm")}
OV_KINDS = {"conv": ("convolution",), "linear/matmul": ("fullyconnected", "matmul"),
            "attention": ("scaleddotproductattention", "softmax", "sdpa"),
            "normalisation": ("mvn", "groupnormalization", "normalizel2")}


def kind_of(name, kinds):
    name = name.lower()
    for kind, words in kinds.items():
        if any(w in name for w in words):
            return kind
    return "elementwise/other"


def build(size, batch):
    import torch
    from omegaconf import OmegaConf
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    unet = instantiate_from_config(config.model.params.unet_config).eval()
    with torch.no_grad():   # zero-initialised output layers would make it vacuous
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    h = size // 8
    inputs = (torch.randn(batch, 4, h, h), torch.full((batch,), 501.0),
              torch.randn(batch, 77, 768))
    return unet, inputs


def torch_profile(unet, inputs, rounds):
    import torch
    from torch.profiler import ProfilerActivity, profile
    x, t, ctx = inputs
    by_kind = defaultdict(float)
    with torch.inference_mode():
        unet(x, t, context=ctx)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                unet(x, t, context=ctx)
    # self time of each operator: nested calls counted once, where the work is done
    for e in prof.key_averages():
        if e.key.startswith("aten::") or e.key.startswith("mkldnn"):
            by_kind[kind_of(e.key, TORCH_KINDS)] += e.self_cpu_time_total / 1e6 / rounds
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return by_kind, [(e.key, e.self_cpu_time_total / 1e6 / rounds) for e in top]


def openvino_model(unet, inputs):
    import openvino as ov
    import torch
    from ldm.backends.openvino import _Bound
    x, t, ctx = inputs
    with torch.no_grad():
        model = ov.convert_model(_Bound(unet, (_slot(0), _slot(1)), {"context": _slot(2)}),
                                 example_input=(x, t, ctx))
    model.reshape({i: ov.PartialShape(list(a.shape)) for i, a in enumerate(inputs)})
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERF_COUNT": True}
    return core.compile_model(model, "CPU", config).create_infer_request()


def _slot(i):
    from ldm.backends.openvino import _Slot
    return _Slot(i)


def openvino_profile(request, inputs, rounds):
    arrays = [a.numpy() for a in inputs]
    request.infer(arrays)
    by_kind, by_exec = defaultdict(float), defaultdict(float)
    for _ in range(rounds):
        request.infer(arrays)
        for info in request.profiling_info:
            seconds = info.real_time.total_seconds()
            by_kind[kind_of(info.node_type, OV_KINDS)] += seconds / rounds
            by_exec[f"{info.node_type} [{info.exec_type}]"] += seconds / rounds
    top = sorted(by_exec.items(), key=lambda kv: -kv[1])[:12]
    return by_kind, top


def layouts(unet, inputs):
    """What torch's own layouts do for the convolutions: single 3x3 convolutions of SD's
    widths in NCHW, channels-last and oneDNN's blocked layout (``torch.utils.mkldnn``,
    weights prepacked), and the whole UNet in NCHW against channels-last."""
    import torch
    from torch.utils import mkldnn

    def median(fn, n=5):
        fn()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    with torch.no_grad():
        for side, cin, cout in ((32, 320, 320), (16, 640, 640), (8, 1280, 1280), (32, 640, 320)):
            x = torch.randn(2, cin, side, side)
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            plain = median(lambda: conv(x))
            last = conv.to(memory_format=torch.channels_last)
            xl = x.to(memory_format=torch.channels_last)
            channels_last = median(lambda: last(xl))
            blocked_conv, xb = mkldnn.to_mkldnn(torch.nn.Conv2d(cin, cout, 3, padding=1)), x.to_mkldnn()
            blocked = median(lambda: blocked_conv(xb))
            print(f"conv {side}x{side} {cin}->{cout}: NCHW {plain * 1e3:.1f} ms, channels-last "
                  f"{channels_last * 1e3:.1f} ms, oneDNN blocked {blocked * 1e3:.1f} ms", flush=True)
        x, t, ctx = inputs
        plain = median(lambda: unet(x, t, context=ctx), 3)
        unet.to(memory_format=torch.channels_last)
        xl = x.to(memory_format=torch.channels_last)
        channels_last = median(lambda: unet(xl, t, context=ctx), 3)
        unet.to(memory_format=torch.contiguous_format)
        print(f"UNet step: NCHW {plain:.2f} s, channels-last {channels_last:.2f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile_openvino", action="store_true")
    p.add_argument("--layouts", action="store_true",
                   help="only time torch's convolution layouts (NCHW, channels-last, blocked)")
    args = p.parse_args()
    import torch
    from benchmark import cpu_name
    from ldm.compare import time_alternating
    unet, inputs = build(args.size, args.batch)
    print(f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; SD v1 UNet "
          f"{args.size}x{args.size} batch {args.batch} fp32", flush=True)
    if args.layouts:
        return layouts(unet, inputs)
    start = time.perf_counter()
    request = openvino_model(unet, inputs)
    print(f"convert_model + compile: {time.perf_counter() - start:.0f} s", flush=True)
    x, t, ctx = inputs
    arrays = [a.numpy() for a in inputs]
    runs = {"torch": lambda: unet(x, t, context=ctx),
            "openvino": lambda: request.infer(arrays)}
    if args.compile_openvino:
        import importlib
        importlib.import_module("openvino.torch")   # registers the backend
        compiled = torch.compile(unet, backend="openvino", dynamic=False,
                                 options={"config": {"INFERENCE_PRECISION_HINT": "f32",
                                                     "PERFORMANCE_HINT": "LATENCY"}})
        start = time.perf_counter()
        try:
            with torch.no_grad():
                compiled(x, t, context=ctx)
        except Exception as e:   # reported, not fatal: the comparison is the point
            print(f"torch.compile(backend='openvino') failed after "
                  f"{time.perf_counter() - start:.0f} s: {type(e).__name__}: "
                  f"{str(e).splitlines()[-1] if str(e) else ''}", flush=True)
        else:
            print(f"torch.compile(backend='openvino') first call: "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            runs["torch.compile-openvino"] = lambda: compiled(x, t, context=ctx)
    with torch.no_grad():
        times, _ = time_alternating(runs, args.rounds)
    for name, v in times.items():
        print(f"step {name:24s} {statistics.median(v):.3f} s (all "
              f"{', '.join(f'{s:.2f}' for s in v)})", flush=True)
    ours, ours_top = torch_profile(unet, inputs, args.rounds)
    theirs, theirs_top = openvino_profile(request, inputs, args.rounds)
    print(f"\nby kind (seconds per step)     {'torch':>8s} {'openvino':>9s}  ratio")
    for kind in sorted(set(ours) | set(theirs), key=lambda k: -ours.get(k, 0)):
        a, b = ours.get(kind, 0.0), theirs.get(kind, 0.0)
        print(f"  {kind:28s} {a:8.3f} {b:9.3f}  {a / b if b else float('inf'):5.2f}")
    print(f"  {'total':28s} {sum(ours.values()):8.3f} {sum(theirs.values()):9.3f}")
    print("\ntorch, top operators (self seconds per step)")
    for name, s in ours_top:
        print(f"  {s:7.3f}  {name}")
    print("\nopenvino, top layer types [kernels] (seconds per step)")
    for name, s in theirs_top:
        print(f"  {s:7.3f}  {name}")


if __name__ == "__main__":
    main()
