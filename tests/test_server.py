"""The HTTP server (scripts/serve.py, ldm.server) with real clients no one here wrote: the
``webuiapi`` package (A1111's API) and the ``openai`` package, on the built-in models, a
server in this process on a free port; the bad-request matrix; auth; the queue."""
import base64
import io
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")
import requests  # noqa: E402  (webuiapi's dependency)
import uvicorn  # noqa: E402

from conftest import run_here  # noqa: E402
from ldm.pipeline import BUILTIN_DIR, BUILTIN_INPAINTING_DIR  # noqa: E402

STEPS = 6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(root):
    """A models folder with the two built-in models, hard-linked (the scan skips links), a
    random LoRA for the built-in model in Lora/ and an embedding in embeddings/."""
    import torch
    from safetensors.torch import save_file
    from test_toolbox import kohya_lora
    from ldm.pipeline import load_model
    for name, src in (("shapes", BUILTIN_DIR), ("shapes-inpainting", BUILTIN_INPAINTING_DIR)):
        (root / name).mkdir(parents=True)
        for f in ("model.safetensors", "config.yaml"):
            try:
                os.link(src / f, root / name / f)
            except OSError:
                (root / name / f).write_bytes((src / f).read_bytes())
    (root / "Lora").mkdir()
    model = load_model(BUILTIN_DIR / "model.safetensors", BUILTIN_DIR / "config.yaml")
    save_file(kohya_lora(model, seed=3), root / "Lora" / "style.safetensors")
    # a tiny SD-1-shaped model with an f8 autoencoder and a ControlNet for it
    from omegaconf import OmegaConf
    from test_controlnet import f8_model
    from conftest import randomize
    from ldm.controlnet import build_controlnet
    tiny, config = f8_model(9)
    (root / "tiny-f8").mkdir()
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()},
              root / "tiny-f8" / "model.safetensors")
    OmegaConf.save(config, root / "tiny-f8" / "config.yaml")
    (root / "ControlNet").mkdir()
    net = randomize(build_controlnet(tiny), 21)
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()},
              root / "ControlNet" / "control_tiny.safetensors")
    (root / "RealESRGAN").mkdir()   # a tiny compact x2 network under Real-ESRGAN's name
    from test_upscalers import case
    torch.save(case("compact_x2")[0], root / "RealESRGAN" / "RealESRGAN_x2plus.pth")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 128, generator=torch.Generator().manual_seed(1))},
              root / "embeddings" / "zqshape.safetensors")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("serve", ROOT / "scripts" / "serve.py")
    serve_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_script)
    from ldm.server import build_service
    from ldm.server.app import create_app
    tmp = tmp_path_factory.mktemp("server")
    models = _models(tmp / "models")
    args = serve_script.build_parser().parse_args([
        "--models-dir", str(models), "--ckpt", str(models / "shapes" / "model.safetensors"),
        "--outdir", str(tmp / "out"), "--safety_checker", "none", "--max-body-mb", "2",
        "--device", "cpu"])
    service = build_service(args).start()
    port = _free_port()
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                            log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield type("Server", (), dict(base=base, port=port, service=service, models=models,
                                  out=tmp / "out", tmp=tmp,
                                  parse=staticmethod(serve_script.build_parser().parse_args)))
    srv.should_exit = True
    thread.join(10)
    service.close()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(port=server.port, sampler="Euler", steps=STEPS)


def _pixels(image):
    return np.asarray(image.convert("RGB"))


def _b64(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- A1111

def test_webuiapi_txt2img_equals_the_cli_byte_for_byte(server, api, tmp_path):
    r = api.txt2img(prompt="a red circle", seed=5, batch_size=2, width=64, height=64,
                    cfg_scale=7.0, sampler_name="Euler", steps=STEPS)
    info = r.info
    assert info["all_seeds"] == [5, 6] and info["index_of_first_image"] == 1
    assert info["sampler_name"] == "Euler" and info["sd_model_hash"] == \
        server.service.settings.checkpoint.hash
    assert len(r.images) == 3 and r.images[0].size == (2 * 64 + 6, 64 + 4)   # grid first
    assert info["infotexts"][0].startswith("a red circle\nSteps: 6, Sampler: Euler, CFG scale: 7")
    assert r.parameters["prompt"] == "a red circle" and r.parameters["steps"] == STEPS
    # the same parameters through scripts/txt2img.py (A1111 prompt syntax, as the server)
    done = run_here("txt2img.py", "--prompt", "a red circle", "--ckpt",
                    server.models / "shapes" / "model.safetensors", "--seed", 5,
                    "--n_samples", 2, "--n_iter", 1, "--H", 64, "--W", 64, "--scale", 7,
                    "--sampler", "Euler", "--ddim_steps", STEPS, "--prompt-syntax", "a1111",
                    "--safety_checker", "none", "--outdir", tmp_path, "--skip_grid")
    assert done.returncode == 0, done.stderr
    for k in range(2):
        cli = Image.open(tmp_path / "samples" / f"{k:05}.png")
        assert _pixels(cli).tobytes() == _pixels(r.images[1 + k]).tobytes()
        # and the PNG carries the same parameters as the CLI's file (the model named as
        # clients name it, not by its path)
        ours, theirs = (json.loads(im.text["ldm_parameters"]) for im in (r.images[1 + k], cli))
        assert ours.pop("model") == "shapes/model"
        assert ours == {key: v for key, v in theirs.items() if key != "model"}
    assert not server.out.exists()     # nothing saved unless asked


def test_save_images_writes_through_the_scripts_writer(server, api):
    r = api.txt2img(prompt="a blue square", seed=11, width=64, height=64, steps=STEPS,
                    save_images=True)
    saved = r.info["saved"]
    assert len(saved) == 1 and saved[0].endswith("txt2img-images/00000.png")
    on_disk = Image.open(saved[0])
    assert _pixels(on_disk).tobytes() == _pixels(r.image).tobytes()
    assert json.loads(on_disk.text["ldm_parameters"])["seed"] == 11
    r2 = api.txt2img(prompt="a blue square", seed=11, width=64, height=64, steps=STEPS,
                     save_images=True)
    assert r2.info["saved"][0].endswith("00001.png")       # never over a file


def test_webuiapi_img2img_with_a_mask_keeps_every_pixel_outside_it(server, api):
    base = api.txt2img(prompt="a green triangle", seed=3, width=64, height=64,
                       steps=STEPS).image.convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 40))
    for full_res in (False, True):
        r = api.img2img(images=[base], mask_image=mask, prompt="a red circle", seed=4,
                        denoising_strength=0.9, inpainting_fill=1, mask_blur=2,
                        inpaint_full_res=full_res, inpaint_full_res_padding=8, width=64,
                        height=64, steps=STEPS)
        out = _pixels(r.image)
        outside = np.asarray(mask) < 128
        assert r.image.size == (64, 64)
        assert (out[outside] == _pixels(base)[outside]).all()
        assert (out[~outside] != _pixels(base)[~outside]).any()
        assert r.info["parameters"][0]["task"] == "inpaint"
    # without a mask: image to image at the strength asked
    r = api.img2img(images=[base], prompt="a red circle", seed=4, denoising_strength=0.5,
                    width=64, height=64, steps=STEPS)
    assert r.info["parameters"][0]["task"] == "img2img" and r.info["denoising_strength"] == 0.5


def test_webuiapi_hires_fix_and_latent_fills(server, api):
    """enable_hr: A1111's hires fix (its fields, its infotext); inpainting_fill 2 and 3
    (latent noise, latent nothing) keep every pixel outside the mask."""
    r = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, steps=STEPS,
                    enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (nearest)",
                    hr_second_pass_steps=2, denoising_strength=0.6)
    assert r.image.size == (96, 96)
    p = r.info["parameters"][0]
    assert (p["hr_scale"], p["hr_steps"], p["strength"]) == (1.5, 2, 0.6)
    assert ("Size: 64x64" in r.info["infotexts"][0] and "Hires upscale: 1.5, Hires steps: 2, "
            "Hires upscaler: Latent (nearest)" in r.info["infotexts"][0])
    assert [m["name"] for m in requests.get(server.base + "/sdapi/v1/latent-upscale-modes"
                                            ).json()][:2] == ["Latent", "Latent (antialiased)"]
    # a Real-ESRGAN file of the RealESRGAN/ folder, by the name A1111 lists it by
    assert "R-ESRGAN 2x+" in [u["name"] for u in api.get_upscalers()]
    r = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, steps=STEPS,
                    enable_hr=True, hr_scale=2, hr_upscaler="R-ESRGAN 2x+",
                    hr_second_pass_steps=2, denoising_strength=0.5)
    from ldm.pipeline import Pipeline
    from ldm.upscalers import load_pixel_upscaler
    ours = Pipeline.load(BUILTIN_DIR / "model.safetensors", device="cpu", safety=False)
    ours.set_text_options(prompt_syntax="a1111")
    up = load_pixel_upscaler(server.models / "RealESRGAN" / "RealESRGAN_x2plus.pth")
    up.name = "R-ESRGAN 2x+"
    want = ours.generate("a red circle", 5, sampler="euler", steps=STEPS, scale=7.0,
                         height=64, width=64, progress=False,
                         hires=dict(upscaler=up, steps=2, strength=0.5))[0]
    assert r.image.size == (128, 128)
    assert _pixels(r.image).tobytes() == _pixels(want.image).tobytes()
    assert "Hires upscaler: R-ESRGAN 2x+" in r.info["infotexts"][0]
    base = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    outside = np.asarray(mask) < 128
    for fill, name in ((2, "latent-noise"), (3, "latent-nothing")):
        r = api.img2img(images=[base], mask_image=mask, prompt="a blue square", seed=4,
                        denoising_strength=0.8, inpainting_fill=fill, mask_blur=0,
                        inpaint_full_res=False, width=64, height=64, steps=STEPS)
        assert (_pixels(r.image)[outside] == _pixels(base)[outside]).all()
        assert r.info["parameters"][0]["fill"] == name


def test_controlnet_units_are_the_librarys(server, api):
    """alwayson_scripts.controlnet as webuiapi sends it (canny with thresholds, a weight, a
    step range): the image the library makes with that ControlNet; the extension's lists
    and detect route; a module that needs weights and a model not in the folder refused."""
    from ldm.controlnet import ControlUnit, load_controlnet, preprocess
    from ldm.pipeline import Pipeline
    rng = np.random.default_rng(2)
    picture = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert api.controlnet_model_list() == ["control_tiny"]
    assert "canny" in api.controlnet_module_list()
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="control_tiny",
                                   weight=0.8, guidance_end=0.8, threshold_a=50,
                                   threshold_b=150)
    common = dict(prompt="a red circle", seed=8, width=64, height=64, steps=STEPS,
                  cfg_scale=7.0, override_settings={"sd_model_checkpoint": "tiny-f8/model"})
    # a fresh alwayson_scripts each call: webuiapi writes the units into its default dict
    r = api.txt2img(controlnet_units=[unit], alwayson_scripts={}, **common)
    plain = api.txt2img(alwayson_scripts={}, **common)
    ours = Pipeline.load(server.models / "tiny-f8" / "model.safetensors", device="cpu",
                         safety=False)
    ours.set_text_options(prompt_syntax="a1111")   # the server's
    net = load_controlnet(server.models / "ControlNet" / "control_tiny.safetensors",
                          ours.model)
    ours.set_controls([ControlUnit(net, preprocess(picture, "canny:50:150"), 0.8, 0.0, 0.8)])
    want = ours.generate("a red circle", 8, sampler="euler", steps=STEPS, scale=7.0,
                         height=64, width=64, progress=False)[0].image
    ours.set_controls([])
    want_plain = ours.generate("a red circle", 8, sampler="euler", steps=STEPS, scale=7.0,
                               height=64, width=64, progress=False)[0].image
    assert _pixels(plain.image).tobytes() == _pixels(want_plain).tobytes()
    assert _pixels(r.image).tobytes() == _pixels(want).tobytes()
    assert _pixels(plain.image).tobytes() != _pixels(want).tobytes()
    assert r.info["parameters"][0]["controlnets"][0]["weight"] == 0.8
    detected = requests.post(server.base + "/controlnet/detect", json={
        "controlnet_module": "canny", "controlnet_input_images": [webuiapi.raw_b64_img(picture)],
        "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}).json()["images"]
    edges = Image.open(io.BytesIO(base64.b64decode(detected[0])))
    assert _pixels(edges).tobytes() == _pixels(preprocess(picture, "canny:50:150")).tobytes()
    for unit, status, message in (
            (dict(model="control_tiny", module="openpose", image=webuiapi.raw_b64_img(picture)),
             422, "module: 'openpose' is not available"),
            (dict(model="control_sd15_depth", image=webuiapi.raw_b64_img(picture)), 404,
             "no controlnet named 'control_sd15_depth'"),
            (dict(model="control_tiny"), 422, "give the control image")):
        bad = requests.post(server.base + "/sdapi/v1/txt2img", json={
            "prompt": "x", "steps": 2, "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
        assert bad.status_code == status and message in bad.json()["detail"], bad.text


def test_options_switch_the_model_and_lists(server, api):
    names = api.util_get_model_names()
    assert any("shapes-inpainting" in n for n in names)
    api.util_set_model("shapes-inpainting/model.safetensors", find_closest=False) \
        if "shapes-inpainting/model.safetensors" in names else \
        api.set_options({"sd_model_checkpoint": "shapes-inpainting/model"})
    try:
        assert "shapes-inpainting" in api.util_get_current_model()
        r = requests.post(server.base + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})
        assert r.status_code == 422 and "inpainting model" in r.json()["detail"]
        base = Image.new("RGB", (64, 64), (40, 40, 200))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (20, 20, 44, 44))
        r = api.img2img(images=[base], mask_image=mask, prompt="a red circle", seed=1,
                        denoising_strength=1.0, inpainting_fill=1, inpaint_full_res=False,
                        width=64, height=64, steps=STEPS)
        assert r.info["is_using_inpainting_conditioning"] is True
    finally:
        api.set_options({"sd_model_checkpoint": "shapes/model"})
    assert "shapes/model" in api.util_get_current_model()
    assert {s["name"] for s in api.get_samplers()} >= {"Euler a", "DPM++ 2M", "DDIM"}
    assert [s["name"] for s in api.get_schedulers()][:2] == ["automatic", "uniform"]
    assert api.get_sd_vae() == [] and [x["name"] for x in api.get_loras()] == ["style"]
    assert set(api.get_embeddings()["loaded"]) == {"zqshape"}
    assert requests.post(server.base + "/sdapi/v1/refresh-checkpoints").status_code == 200


def test_prompt_lora_tags_and_the_embeddings_folder(server, api, tmp_path):
    """<lora:style:0.8> merges the folder's LoRA for that request only, as --lora
    FILE:0.8 does in the scripts (the same image); the embeddings folder's token works."""
    args = dict(seed=2, width=64, height=64, steps=STEPS, sampler_name="Euler")
    plain = api.txt2img(prompt="a red circle", **args)
    styled = api.txt2img(prompt="a red circle <lora:style:0.8>", **args)
    assert _pixels(plain.image).tobytes() != _pixels(styled.image).tobytes()
    lora = styled.info["parameters"][0]["loras"][0]
    assert lora["name"] == "style" and lora["weight"] == 0.8
    assert 'Lora hashes: "style: ' in styled.info["infotexts"][0]
    again = api.txt2img(prompt="a red circle", **args)     # unmerged after
    assert _pixels(again.image).tobytes() == _pixels(plain.image).tobytes()
    done = run_here("txt2img.py", "--prompt", "a red circle", "--ckpt",
                    server.models / "shapes" / "model.safetensors", "--seed", 2,
                    "--n_samples", 1, "--n_iter", 1, "--H", 64, "--W", 64, "--scale", 7,
                    "--sampler", "Euler", "--ddim_steps", STEPS, "--prompt-syntax", "a1111",
                    "--lora", f"{server.models / 'Lora' / 'style.safetensors'}:0.8",
                    "--embedding", server.models / "embeddings" / "zqshape.safetensors",
                    "--safety_checker", "none", "--outdir", tmp_path, "--skip_grid")
    assert done.returncode == 0, done.stderr
    cli = Image.open(tmp_path / "samples" / "00000.png")
    assert _pixels(cli).tobytes() == _pixels(styled.image).tobytes()
    token = api.txt2img(prompt="a zqshape circle", **args)
    assert token.info["parameters"][0]["embeddings"][0]["token"] == "zqshape"
    assert "TI hashes" in token.info["infotexts"][0]


def test_override_settings_apply_to_one_request_only(server, api):
    """override_settings change one request (clip skip here); asked to outlive it
    (restore_afterwards false), they still do not, and the info says so."""
    args = dict(prompt="a red circle", seed=5, width=64, height=64, steps=STEPS)
    plain = api.txt2img(**args)
    skip = api.txt2img(**args, override_settings={"CLIP_stop_at_last_layers": 2},
                       override_settings_restore_afterwards=False)
    assert skip.info["parameters"][0]["clip_skip"] == 2
    assert _pixels(skip.image).tobytes() != _pixels(plain.image).tobytes()
    assert any("override_settings_restore_afterwards" in n for n in skip.info["notes"])
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1
    assert _pixels(api.txt2img(**args).image).tobytes() == _pixels(plain.image).tobytes()


def test_png_info_reads_back_the_parameters(server, api):
    r = api.txt2img(prompt="a red circle", negative_prompt="blur", seed=8, width=64,
                    height=64, steps=STEPS)
    info = api.png_info(r.image).json
    assert info["info"].startswith("a red circle\nNegative prompt: blur\nSteps: 6")
    assert info["parameters"]["Seed"] == "8" and info["parameters"]["Prompt"] == "a red circle"
    assert info["ldm_parameters"]["seed"] == 8


def _progress(server, **params):
    return requests.get(server.base + "/sdapi/v1/progress", params=params).json()


def test_interrupt_returns_what_is_done_and_the_next_job_is_unaffected(server, api):
    before = api.txt2img(prompt="a red circle", seed=21, width=64, height=64, steps=STEPS)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.txt2img(
        prompt="a long one", seed=1, width=64, height=64, steps=400,
        sampler_name="Euler")))
    t.start()
    while True:
        p = api.get_progress()     # the running job's
        if p["state"].get("status") == "running" and p["state"]["sampling_step"] > 2:
            break
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["current_image"]      # a live preview
    Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).verify()
    api.interrupt()
    t.join(60)
    r = out["r"]
    assert r.info["interrupted"] is True and len(r.images) == 1
    step = r.info["extra_generation_params"]["stopped_at_step"]
    assert int(step.split("/")[0]) < 400
    after = api.txt2img(prompt="a red circle", seed=21, width=64, height=64, steps=STEPS)
    assert _pixels(after.image).tobytes() == _pixels(before.image).tobytes()
    assert _progress(server)["state"]["job_count"] == 0


def test_skip_ends_the_current_batch_only(server, api):
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.txt2img(
        prompt="x", seed=1, width=64, height=64, steps=300, n_iter=2)))
    t.start()
    while api.get_progress()["state"]["sampling_step"] < 2:
        time.sleep(0.05)
    api.skip()
    while True:   # the second batch runs
        p = api.get_progress()
        if p["state"]["job_no"] == 1 and p["state"]["sampling_step"] > 1:
            break
        time.sleep(0.05)
    api.interrupt()
    t.join(60)
    assert len(out["r"].info["all_seeds"]) == 2 and out["r"].info["interrupted"]


def test_the_queue_runs_first_in_first_out_and_drops_a_client_that_left(server):
    service = server.service
    blocker = {}
    t = threading.Thread(target=lambda: blocker.update(r=requests.post(
        server.base + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 300, "width": 64,
                                                 "height": 64, "force_task_id": "blocker"})))
    t.start()
    while getattr(service.find("blocker"), "state", None) != "running":
        time.sleep(0.05)
    assert _progress(server, id_task="blocker")["state"]["status"] == "running"
    # a client that gives up while queued: its job is dropped
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.base + "/sdapi/v1/txt2img", timeout=0.5,
                      json={"prompt": "x", "steps": 2, "force_task_id": "gone"})
    ids = [f"fifo-{i}" for i in range(4)]
    threads = []
    for job_id in ids:
        th = threading.Thread(target=requests.post, args=(server.base + "/sdapi/v1/txt2img",),
                              kwargs={"json": {"prompt": "x", "steps": 2, "seed": 1,
                                               "force_task_id": job_id}})
        th.start()
        threads.append(th)
        while service.queue.find(job_id) is None:
            time.sleep(0.01)
    positions = [_progress(server, id_task=i)["state"]["queue_position"] for i in ids]
    assert positions == sorted(positions)
    deadline = time.time() + 10
    while service.find("gone").state != "cancelled" and time.time() < deadline:
        time.sleep(0.05)
    assert service.find("gone").state == "cancelled"
    requests.post(server.base + "/sdapi/v1/interrupt")
    t.join(60)
    for th in threads:
        th.join(60)
    starts = [service.find(i).started for i in ids]
    assert starts == sorted(starts)
    assert _progress(server)["state"]["job_count"] == 0


def test_two_workers_behind_one_queue_make_the_same_images(server, api):
    """--device cpu,cpu: one engine per device; every job's image is the one a single
    worker makes for its seed, whichever worker ran it."""
    from ldm.server import a1111, build_service
    args = server.parse(["--models-dir", str(server.models), "--device", "cpu,cpu",
                         "--safety_checker", "none", "--outdir", str(server.tmp / "two")])
    service = build_service(args).start()
    try:
        jobs = []
        for seed in range(30, 34):
            gen, settings, _ = a1111.read({"prompt": "a red circle", "seed": seed,
                                           "steps": STEPS, "sampler_name": "Euler"},
                                          service, "txt2img")
            jobs.append(service.submit(lambda engine, job, gen=gen: service.run(gen, engine, job),
                                       settings))
        images = [service.wait(job).samples[0].image for job in jobs]
        assert {job.worker for job in jobs} == {0, 1}
    finally:
        service.close()
    for seed, image in zip(range(30, 34), images):
        one = api.txt2img(prompt="a red circle", seed=seed, steps=STEPS, sampler_name="Euler",
                          width=64, height=64).image
        assert _pixels(one).tobytes() == _pixels(image).tobytes()


# ----------------------------------------------------------------------------- OpenAI

def test_openai_client_generates_and_edits(server):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused")
    r = client.images.generate(prompt="a red circle", n=2, size="64x64",
                               response_format="b64_json", extra_body={"seed": 3, "steps": STEPS})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    assert [im.size for im in images] == [(64, 64)] * 2
    assert [json.loads(im.text["ldm_parameters"])["seed"] for im in images] == [3, 4]
    base = images[0].convert("RGBA")
    mask = base.copy()
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))      # transparent: repaint there
    buf, mbuf = io.BytesIO(), io.BytesIO()
    base.save(buf, "PNG")
    mask.save(mbuf, "PNG")
    e = client.images.edit(image=("image.png", buf.getvalue(), "image/png"),
                           mask=("mask.png", mbuf.getvalue(), "image/png"),
                           prompt="a blue square", n=1, size="64x64",
                           extra_body={"seed": "5", "steps": str(STEPS)})
    edited = Image.open(io.BytesIO(base64.b64decode(e.data[0].b64_json)))
    keep = np.ones((64, 64), bool)
    keep[16:48, 16:48] = False
    assert (_pixels(edited)[keep] == _pixels(base)[keep]).all()
    assert json.loads(edited.text["ldm_parameters"])["task"] == "inpaint"
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="huge")


# ----------------------------------------------------------------------------- bad requests

def _png_bytes(size=(64, 64)):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


T2I, I2I, OPT = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options"
GEN = "/v1/images/generations"
BAD = [  # (method, path, body (raw str or JSON), status, words in the message)
    ("POST", T2I, "{not json", 400, "not valid JSON"),
    ("POST", T2I, [1, 2], 422, "JSON object"),
    ("POST", T2I, {"steps": "many"}, 422, "steps"),
    ("POST", T2I, {"steps": 0}, 422, "steps: 0 is out of range"),
    ("POST", T2I, {"steps": -5}, 422, "steps"),
    ("POST", T2I, '{"cfg_scale": NaN}', 422, "cfg_scale: nan is not a finite number"),
    ("POST", T2I, {"width": 66}, 422, "width 66 is not a multiple of"),
    ("POST", T2I, {"width": 40000, "height": 40000}, 422, "pixels per image"),
    ("POST", T2I, {"batch_size": 9, "n_iter": 2}, 422, "18 images"),
    ("POST", T2I, {"sampler_name": "Warp drive"}, 422, "unknown sampler"),
    ("POST", T2I, {"scheduler": "align_your_steps"}, 422, "scheduler"),
    ("POST", T2I, {"seed": "abc"}, 422, "seed"),
    ("POST", T2I, {"seed": 2 ** 70}, 422, "seed"),
    ("POST", T2I, {"prompt": 123}, 422, "prompt"),
    ("POST", T2I, {"prompt": "x" * 20001}, 422, "more than the server's"),
    ("POST", T2I, {"prompt": "<lora:nope:0.5> x"}, 404, "no lora named 'nope'"),
    ("POST", T2I, {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, 422,
     "hr_upscaler: 'ESRGAN_4x' is not available"),
    ("POST", T2I, {"enable_hr": True, "hr_sampler_name": "DDIM"}, 422, "hr_sampler_name"),
    ("POST", T2I, {"enable_hr": True, "hr_scale": 20}, 422, "hr_scale: 20 is out of range"),
    ("POST", T2I, {"alwayson_scripts": {"controlnet": {"args": [{"enabled": True}]}}}, 422,
     "controlnet"),
    ("POST", T2I, {"override_settings": {"sd_model_checkpoint": "../../../etc/passwd"}}, 404,
     "only files in the server's models folders"),
    ("POST", T2I, {"override_settings": {"no_such_option": 1}}, 422, "unknown option"),
    ("POST", OPT, {"sd_model_checkpoint": "/abs/model.ckpt"}, 404, "models folders"),
    ("POST", OPT, {"sd_vae": "missing.safetensors"}, 404, "no vae named"),
    ("POST", OPT, {"what": 1}, 422, "unknown option 'what'"),
    ("POST", OPT, {"CLIP_stop_at_last_layers": 99}, 422, "CLIP_stop_at_last_layers"),
    ("POST", OPT, {"show_progress_type": "Sharp"}, 422, "show_progress_type: one of"),
    ("POST", I2I, {"prompt": "x"}, 422, "init_images"),
    ("POST", I2I, {"init_images": ["!!!"]}, 422, "init_images[0]"),
    ("POST", I2I, {"init_images": [base64.b64encode(b"not an image").decode()]}, 422,
     "not an image"),
    ("POST", I2I, {"init_images": [_png_bytes()], "mask": _png_bytes((32, 32))}, 422,
     "mask of the image's size"),
    ("POST", I2I, {"init_images": [_png_bytes()], "denoising_strength": 1.5}, 422,
     "denoising_strength"),
    ("POST", I2I, {"init_images": [_png_bytes()], "mask": _png_bytes(), "inpainting_fill": 4},
     422, "inpainting_fill"),
    ("POST", "/sdapi/v1/png-info", {"image": "abc"}, 422, "image"),
    ("GET", "/sdapi/v1/progress?id_task=never", None, 404, "no job"),
    ("GET", "/sdapi/v1/nothing", None, 404, "no route"),
    ("GET", T2I, None, 400, "not allowed"),
    ("POST", T2I, "x" * (3 * 2 ** 20), 413, "bytes"),
    ("POST", GEN, {}, 400, "prompt: required"),
    ("POST", GEN, {"prompt": "x", "size": "big"}, 400, "size"),
    ("POST", GEN, {"prompt": "x", "n": 0}, 400, "n: 0"),
    ("POST", GEN, {"prompt": "x", "model": "../x"}, 404, "models folders"),
    ("POST", "/v1/images/edits", {"prompt": "x"}, 400, "multipart"),
]


@pytest.mark.parametrize("method, path, body, status, words", BAD,
                         ids=[f"{i}-{b[1].rsplit('/', 1)[-1][:12]}" for i, b in enumerate(BAD)])
def test_a_bad_request_is_one_line_and_changes_nothing(server, method, path, body, status,
                                                       words):
    before = dict(server.service.options)
    files = sorted(server.out.rglob("*")) if server.out.exists() else []
    data = body if isinstance(body, str) else None if body is None else json.dumps(body)
    r = requests.request(method, server.base + path, data=data,
                         headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    answer = r.json()
    message = answer["error"]["message"] if path.startswith("/v1/") else answer["detail"]
    assert words in message and "\n" not in message and "Traceback" not in message
    assert server.service.options == before
    assert requests.get(server.base + "/sdapi/v1/progress").status_code == 200
    assert (sorted(server.out.rglob("*")) if server.out.exists() else []) == files


# ----------------------------------------------------------------------------- auth, start

def test_auth_guards_every_route_and_the_page(server):
    from fastapi.testclient import TestClient
    from ldm.server.app import create_app
    client = TestClient(create_app(server.service, {"me": "secret"}))
    for method, path in (("GET", "/"), ("GET", "/sdapi/v1/options"), ("POST", T2I),
                         ("GET", "/sdapi/v1/sd-models"), ("POST", GEN), ("GET", "/docs")):
        for auth in (None, ("me", "wrong"), ("you", "secret")):
            r = client.request(method, path, auth=auth)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert client.get("/", auth=("me", "secret")).status_code == 200
    assert client.get("/sdapi/v1/options", auth=("me", "secret")).json()["sd_vae"] == "Automatic"
    # an OpenAI client's API key is user:password
    r = client.post(GEN, json={}, headers={"Authorization": "Bearer me:secret"})
    assert r.status_code == 400


def test_the_page_is_served_whole_with_nothing_from_outside(server):
    html = requests.get(server.base + "/").text
    assert "/sdapi/v1/txt2img" in html and "<canvas" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_serve_refuses_listen_without_auth_and_bad_flags(tmp_path):
    done = run_here("serve.py", "--listen", "--outdir", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --listen serves every")
    done = run_here("serve.py", "--api-auth", "nopassword", "--outdir", tmp_path)
    assert done.returncode == 2 and "user:password" in done.stderr
    done = run_here("serve.py", "--lora", "x.safetensors", "--outdir", tmp_path)
    assert done.returncode == 2 and "<lora" not in done.stderr and "--lora-dir" in done.stderr


# ----------------------------------------------------------------------------- the page

def _chromium():
    import shutil
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt install chromium)")
def test_the_page_in_a_real_browser(server, tmp_path):
    """Type a prompt, generate, see the progress and the image; paint a mask and inpaint.
    LDM_SCREENSHOTS=folder keeps a screenshot of each state (docs/server/)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = os.environ.get("LDM_SCREENSHOTS")
    Image.new("RGB", (64, 64), (30, 60, 160)).save(tmp_path / "blue.png")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 820})
        page.goto(server.base + "/")
        page.wait_for_function("document.querySelectorAll('#sampler option').length > 5")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "150")
        page.fill("#seed", "7")
        page.click("#go")
        page.wait_for_function("document.getElementById('live').src.startsWith('data:')"
                               " && parseFloat(document.getElementById('bar').style.width) > 0")
        if shots:
            page.screenshot(full_page=True, path=f"{shots}/1-progress.png")
        page.wait_for_selector("#gallery figure", timeout=120000)
        caption = page.inner_text("#gallery figure figcaption")
        assert caption.startswith("a red circle") and "Seed: 7" in caption
        if shots:
            page.screenshot(full_page=True, path=f"{shots}/2-result.png")
        # the hires fix: twice the size, A1111's fields in the caption
        page.check("#hires")
        page.fill("#steps", "10")
        page.fill("#hrSteps", "3")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('#gallery figure').length === 2",
                               timeout=120000)
        caption = page.inner_text("#gallery figure figcaption")
        assert "Hires upscale: 2" in caption and "Hires steps: 3" in caption, caption
        src = page.get_attribute("#gallery figure img", "src")
        assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (128, 128)
        page.uncheck("#hires")
        # image to image with a painted mask
        page.click("#tabImg")
        page.set_input_files("#initFile", str(tmp_path / "blue.png"))
        page.wait_for_function("document.getElementById('maskCanvas').width === 64")
        page.fill("#steps", "20")
        box = page.locator("#maskCanvas").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=8)
        page.mouse.up()
        page.fill("#prompt", "a yellow square")
        page.fill("#strength", "1")
        if shots:
            page.screenshot(full_page=True, path=f"{shots}/3-mask.png")
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('#gallery figure').length === 3",
                               timeout=120000)
        caption = page.inner_text("#gallery figure figcaption")
        assert caption.startswith("a yellow square") and "Mask blur" in caption
        src = page.get_attribute("#gallery figure img", "src")
        out = _pixels(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
        assert (out[32, 32] != (30, 60, 160)).any() and (out[2, 60] == (30, 60, 160)).all()
        assert page.inner_text("#error") == ""
        if shots:
            page.screenshot(full_page=True, path=f"{shots}/4-inpainted.png")
        browser.close()
