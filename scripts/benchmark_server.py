"""The server under load, against the library call it wraps, on the built-in model.

    python scripts/benchmark_server.py [--requests 200] [--steps 20]

Starts scripts/serve.py in its own process, then:
1. the library's time per image (``Pipeline.run``, in this process, same request) and the
   reference image of every seed;
2. 1, 4 and 32 concurrent clients (A1111's txt2img, one image each, distinct seeds):
   requests/s, p50/p95 latency, every answer checked byte for byte against the library's
   image of its seed, the queue's order (each job started in the order it was received);
3. an interrupt and a client that leaves in the middle of a job, each followed by a job
   whose image must be unchanged;
4. the server's RSS after warm-up and after everything.
Prints a table; nothing is timed in the test suite.
"""
import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=200, help="requests at 32 clients")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import numpy as np
    import requests
    import torch
    from PIL import Image
    from ldm.pipeline import BUILTIN_DIR, Pipeline

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()})")
    body = dict(prompt="a red circle on a blue background", negative_prompt="",
                sampler_name="DPM++ 2M", scheduler="karras", steps=args.steps, cfg_scale=7.0,
                width=64, height=64)

    # 1. the library: the reference images and its time per image
    pipe = Pipeline.load(BUILTIN_DIR / "model.safetensors", safety=False, device="cpu")
    pipe.set_text_options(prompt_syntax="a1111")
    pipe.model_name = "shapes/model"
    total = args.requests + 40 + 20 + 8
    seeds = list(range(1000, 1000 + total))

    def library(seed):
        return pipe.generate(body["prompt"], [seed], sampler="dpmpp_2m", schedule="karras",
                             steps=args.steps, scale=7.0, height=64, width=64,
                             progress=False)[0].image
    library(1)   # warm-up
    t = time.perf_counter()
    reference = {}
    for k, s in enumerate(seeds):
        reference[s] = np.asarray(library(s)).tobytes()
        if k % 50 == 49:
            print(f"  library: {k + 1}/{len(seeds)} reference images, "
                  f"{(time.perf_counter() - t) / (k + 1) * 1000:.0f} ms each", flush=True)
    per_image = (time.perf_counter() - t) / len(seeds)
    print(f"library: {per_image * 1000:.0f} ms per 64x64 image ({args.steps} steps, "
          f"{len(seeds)} images)")
    pipe = None   # its memory back before the server starts

    # 2. the server
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--port",
                               str(port), "--safety_checker", "none", "--ckpt",
                               str(BUILTIN_DIR / "model.safetensors"), "--device", "cpu",
                               "--outdir", "/tmp/benchmark-server-out"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                requests.get(base + "/sdapi/v1/progress", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        session_local = threading.local()

        def post(seed, task_id=None, timeout=None):
            s = getattr(session_local, "s", None) or requests.Session()
            session_local.s = s
            t0 = time.perf_counter()
            r = s.post(base + "/sdapi/v1/txt2img", timeout=timeout,
                       json=dict(body, seed=seed, force_task_id=task_id or f"seed-{seed}"))
            latency = time.perf_counter() - t0
            r.raise_for_status()
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            return seed, latency, np.asarray(image.convert("RGB")).tobytes()

        for s in seeds[:3]:
            post(s)   # warm-up
        rss_before = rss_mib(server.pid)
        rows, next_seed, wrong, order_ok = [], 3, 0, True
        for clients, count in ((1, 20), (4, 40), (32, args.requests)):
            batch = seeds[next_seed:next_seed + count]
            next_seed += count
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(post, batch))
            wall = time.perf_counter() - t0
            wrong += sum(img != reference[s] for s, _, img in results)
            lat = sorted(r[1] for r in results)
            p95 = lat[min(len(lat) - 1, int(round(0.95 * len(lat))) - 1)]
            rows.append((clients, count, count / wall, statistics.median(lat), p95))
            # FIFO: jobs started in the order the server received them
            times = [requests.get(base + "/sdapi/v1/progress",
                                  params={"id_task": f"seed-{s}"}).json()["state"]
                     for s in batch]
            order = sorted(times, key=lambda st: st["submitted_at"])
            order_ok &= [st["started_at"] for st in order] == sorted(st["started_at"]
                                                                     for st in order)
        # 3. an interrupt, then a client that leaves, each mid-job; the next job unchanged
        long_seed, check = seeds[next_seed], seeds[next_seed + 1]
        out = {}
        th = threading.Thread(target=lambda: out.update(r=requests.post(
            base + "/sdapi/v1/txt2img", json=dict(body, seed=long_seed, steps=400))))
        th.start()
        while requests.get(base + "/sdapi/v1/progress").json()["state"]["sampling_step"] < 5:
            time.sleep(0.05)
        requests.post(base + "/sdapi/v1/interrupt")
        th.join()
        interrupted_ok = out["r"].status_code == 200 and post(check)[2] == reference[check]
        try:
            requests.post(base + "/sdapi/v1/txt2img", timeout=1.0,
                          json=dict(body, seed=long_seed, steps=400))
        except requests.exceptions.ReadTimeout:
            pass
        time.sleep(0.5)
        t0 = time.perf_counter()
        left_ok = post(check)[2] == reference[check]
        after_leave = time.perf_counter() - t0
        rss_after = rss_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    print(f"\n{'clients':>7} {'requests':>8} {'req/s':>6} {'p50 s':>6} {'p95 s':>6} "
          f"{'vs library':>10}")
    for clients, count, rate, p50, p95 in rows:
        print(f"{clients:>7} {count:>8} {rate:>6.2f} {p50:>6.3f} {p95:>6.3f} "
              f"{rate * per_image:>9.2f}x")
    one = rows[0]
    print(f"\nserver overhead per image at 1 client: {(one[3] - per_image) * 1000:.0f} ms "
          f"(p50 {one[3] * 1000:.0f} ms vs the library's {per_image * 1000:.0f} ms)")
    checked = sum(r[1] for r in rows)
    print(f"images byte-identical to the library's: {checked - wrong} of {checked}")
    print(f"queue order kept: {order_ok}")
    print(f"after an interrupt, the next image unchanged: {interrupted_ok}; after a client left "
          f"mid-job: {left_ok} (answered in {after_leave:.1f} s: the left job was stopped)")
    print(f"server RSS: {rss_before:.0f} MiB after warm-up, {rss_after:.0f} MiB after "
          f"{next_seed + 4} requests ({rss_after - rss_before:+.0f} MiB)")


if __name__ == "__main__":
    main()
