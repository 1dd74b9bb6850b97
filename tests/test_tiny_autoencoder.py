"""The tiny autoencoder (TAESD, ``ldm.models.tiny_autoencoder``) against diffusers'
``AutoencoderTiny`` on identical random weights, in each form its weights are published:
diffusers' file, and the author's ``taesd_decoder``/``taesd_encoder`` pair (``.pth``
through the restricted unpickler, ``.safetensors``)."""
import logging

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG, randomize, rel_err

diffusers = pytest.importorskip("diffusers")
PROMPTS, SEEDS = ["a red circle", "two blue squares"], [3, 4]


def author_layout(theirs):
    """(decoder, encoder) state dicts as the author's taesd.py names them: the reverse of
    diffusers' own conversion script (scripts/convert_tiny_autoencoder_to_diffusers.py:
    encoder layer N is ``encoder.layers.N``, decoder layer N is ``decoder.layers.N-1``,
    the decoder's clamp being layer 0 of the author's Sequential)."""
    decoder, encoder = {}, {}
    for k, v in theirs.state_dict().items():
        side, _, n, rest = k.split(".", 3)
        if side == "encoder":
            encoder[f"{n}.{rest}"] = v.clone()
        else:
            decoder[f"{int(n) + 1}.{rest}"] = v.clone()
    return decoder, encoder


@pytest.fixture(scope="module")
def twin():
    """diffusers' AutoencoderTiny (TAESD's shapes) with random weights, as SD 1.x's."""
    torch.manual_seed(0)
    return randomize(diffusers.AutoencoderTiny(), 5).eval()


def f8_model(seed=1):
    """The tiny SD-1-shaped model with an f8 autoencoder (TAESD's factor)."""
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.first_stage_config.params.ddconfig.ch_mult = [1, 2, 2, 2]
    return randomize(instantiate_from_config(config.model), seed).eval(), config


def write(form, twin, folder):
    """The twin's weights as a user would have them; returns the path given to --vae."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    decoder, encoder = author_layout(twin)
    if form == "diffusers-folder":
        twin.save_pretrained(folder / "taesd")
        return folder / "taesd"
    if form == "diffusers-file":
        twin.save_pretrained(folder / "taesd")
        return folder / "taesd" / "diffusion_pytorch_model.safetensors"
    if form == "author-pth":
        torch.save(decoder, folder / "taesd_decoder.pth")
        torch.save(encoder, folder / "taesd_encoder.pth")
        return folder / "taesd_decoder.pth"
    if form == "author-safetensors":
        save_file(decoder, folder / "taesd_decoder.safetensors")
        save_file(encoder, folder / "taesd_encoder.safetensors")
        return folder / "taesd_decoder.safetensors"
    if form == "decoder-only":
        save_file(decoder, folder / "taesd_decoder.safetensors")
        return folder / "taesd_decoder.safetensors"
    raise ValueError(form)


@pytest.mark.parametrize("form", ["diffusers-folder", "diffusers-file", "author-pth",
                                  "author-safetensors", "decoder-only"])
@torch.no_grad()
def test_decode_and_encode_equal_diffusers_autoencoder_tiny(tmp_path, twin, form):
    from ldm.pipeline import load_vae
    model, _ = f8_model()
    record = load_vae(model, write(form, twin, tmp_path))
    assert record["name"] and len(record["hash"]) == 10
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=g) * 2            # the UNet's latents
    ours = model.decode_first_stage(z)
    theirs = twin.decode(z).sample                            # diffusers: scaling_factor 1
    assert ours.shape == (2, 3, 64, 64) and ours.abs().max() > 0.1
    assert rel_err(ours, theirs) < 1e-5
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    if form == "decoder-only":
        from ldm.errors import UsageError
        with pytest.raises(UsageError, match="no encoder"):
            model.encode_image(x)
        return
    assert rel_err(model.encode_image(x), twin.encode(x).latents) < 1e-5


def test_txt2img_with_taesd_equals_diffusers_pipeline_with_autoencoder_tiny(tmp_path, twin):
    """The whole text-to-image run with ``vae=`` TAESD: the same pixels as diffusers'
    StableDiffusionPipeline given the same weights, AutoencoderTiny as its vae."""
    import numpy as np
    from ldm.compare import diffusers_components
    from ldm.pipeline import Pipeline, load_vae
    model, config = f8_model(7)
    parts = diffusers_components(model, config, tmp_path / "tok")
    load_vae(model, write("author-safetensors", twin, tmp_path))
    ours = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    out = ours.generate(PROMPTS, SEEDS, sampler="ddim", steps=4, height=64, width=64,
                        progress=False)
    parts["vae"] = twin
    theirs = diffusers.StableDiffusionPipeline(**parts)
    theirs.set_progress_bar_config(disable=True)
    x, _ = ours.initial_noise(SEEDS, 64, 64)
    images = theirs(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                    latents=x.clone(), output_type="np").images
    for sample, want in zip(out, images):
        got = np.asarray(sample.image, dtype=np.float32) / 255
        assert np.abs(got - want).max() < 2 / 255
        assert got.std() > 0.02


def test_a_tiny_autoencoder_that_does_not_fit_is_one_line(tmp_path, twin, caplog):
    from safetensors.torch import save_file
    from ldm.checkpoint import CheckpointError
    from ldm.families import describe, shapes_of
    from ldm.pipeline import load_vae
    decoder, encoder = author_layout(twin)
    model, _ = f8_model()
    wide = dict(decoder)
    wide["1.weight"] = torch.zeros(64, 16, 3, 3)       # TAESD3's 16-channel latents
    save_file(wide, tmp_path / "taesd3_decoder.safetensors")
    with pytest.raises(CheckpointError, match="16-channel latents and this model's have 4"):
        load_vae(model, tmp_path / "taesd3_decoder.safetensors")
    save_file(encoder, tmp_path / "taesd_encoder.safetensors")
    with pytest.raises(CheckpointError, match="encoder alone"):
        load_vae(model, tmp_path / "taesd_encoder.safetensors")
    from conftest import build_tiny
    with pytest.raises(CheckpointError, match="8x8-pixel latents and this model's are 4x4"):
        load_vae(build_tiny(), write("author-pth", twin, tmp_path / "f4"))
    assert "tiny autoencoder (TAESD) alone" in describe(shapes_of(decoder))
    save_file(decoder, tmp_path / "taesdxl_decoder.safetensors")
    with caplog.at_level(logging.WARNING, logger="ldm"):
        load_vae(model, tmp_path / "taesdxl_decoder.safetensors")
    assert any("for SDXL" in r.message for r in caplog.records)


@pytest.mark.parametrize("with_taesd", [True, False], ids=["taesd", "linear-map"])
def test_preview_shows_the_running_estimate_and_goes_away(tmp_path, twin, monkeypatch,
                                                          with_taesd):
    """txt2img.py --preview 2 over 4 steps: OUTDIR/preview.png written whole twice (by
    TAESD when --vae is one, else by the linear map), gone when the run ends; the samples
    as without it."""
    import io
    import os
    from PIL import Image
    from safetensors.torch import save_file
    from conftest import run_here
    model, config = f8_model(9)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "m.safetensors")
    OmegaConf.save(config, tmp_path / "m.yaml")
    vae = write("author-safetensors", twin, tmp_path / "taesd")
    seen, real = [], os.replace

    def replace(src, dst):
        if str(dst).endswith("preview.png"):
            seen.append(Image.open(io.BytesIO(open(src, "rb").read())))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    common = ["--prompt", "a red circle", "--ckpt", tmp_path / "m.safetensors", "--config",
              tmp_path / "m.yaml", "--ddim_steps", 4, "--n_samples", 1, "--n_iter", 1,
              "--H", 64, "--W", 64, "--safety_checker", "none", "--skip_grid"]
    if with_taesd:
        common += ["--vae", vae]
    done = run_here("txt2img.py", *common, "--preview", 2, "--outdir", tmp_path / "a")
    assert done.returncode == 0, done.stderr
    assert len(seen) == 2 and all(im.size == (64, 64) for im in seen)
    assert np_std(seen[-1]) > 1
    assert not (tmp_path / "a" / "preview.png").exists()
    assert not list((tmp_path / "a").glob(".preview*"))
    again = run_here("txt2img.py", *common, "--outdir", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    a, b = (Image.open(tmp_path / d / "samples" / "00000.png") for d in "ab")
    assert a.tobytes() == b.tobytes()
    bad = run_here("txt2img.py", *common, "--preview", 1, "--preview_vae",
                   tmp_path / "m.safetensors", "--outdir", tmp_path / "c")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: --preview_vae {tmp_path / 'm.safetensors'} is not a tiny autoencoder "
        "(TAESD: taesd_decoder.pth, taesdxl_decoder.pth...)"]


def np_std(image):
    import numpy as np
    return float(np.asarray(image, dtype=np.float32).std())


def test_a_preview_stopped_before_the_first_image_leaves_no_folder(tmp_path):
    """Ctrl-C after a preview was written but before any sample: the preview and the
    folder it made are gone."""
    from PIL import Image
    from ldm.preview import PreviewFile

    class Flat:
        def image(self, latents):
            return Image.new("RGB", (8, 8))
    out = tmp_path / "new" / "outdir"
    preview = PreviewFile(Flat(), out / "preview.png", 1)
    preview(torch.zeros(1, 4, 2, 2))
    assert (out / "preview.png").is_file()
    preview.close()
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    preview = PreviewFile(Flat(), kept / "preview.png", 1)
    preview(torch.zeros(1, 4, 2, 2))
    preview.close()
    assert kept.is_dir() and not list(kept.iterdir())


def test_server_previews_decode_with_the_taesd_in_its_vae_approx_folder(tmp_path, twin):
    """The server's live preview (A1111's show_progress_type "TAESD", its default): the
    TAESD decoder in models/VAE-approx that fits the loaded model (not TAESD3's 16 channels,
    not SDXL's taesdxl for an SD 1 model) decodes the estimate as diffusers' AutoencoderTiny
    does; "Full" decodes with the model's own autoencoder; the built-in model (4x4-pixel
    latents) keeps the cheap linear map. Those files are not offered as checkpoints."""
    import io
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file
    from conftest import build_tiny
    from ldm.pipeline import Pipeline
    from ldm.preview import FullPreview
    from ldm.server import tiny_preview
    from ldm.server.folders import Folders
    approx = tmp_path / "models" / "VAE-approx"
    approx.mkdir(parents=True)
    decoder, encoder = author_layout(twin)
    wide = dict(decoder)
    wide["1.weight"] = torch.zeros(64, 16, 3, 3)
    save_file(wide, approx / "taesd3_decoder.safetensors")
    save_file({k: v + 1 for k, v in decoder.items()}, approx / "taesdxl_decoder.safetensors")
    save_file(decoder, approx / "taesd_decoder.safetensors")
    save_file(encoder, approx / "taesd_encoder.safetensors")
    folders = Folders.under(tmp_path / "models").refresh()
    assert [e.filename for e in folders.found["vae_approx"]] == [
        "taesd3_decoder.safetensors", "taesd_decoder.safetensors", "taesdxl_decoder.safetensors"]
    assert folders.found["checkpoints"] == []
    model, _ = f8_model(4)
    pipe = Pipeline(model, torch.device("cpu"), "full", watermark=False)
    preview = tiny_preview(pipe, folders.found["vae_approx"])
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)) * 2
    got = np.asarray(preview.image(z), dtype=np.float32) / 255
    with torch.no_grad():
        want = (twin.decode(z).sample[0].permute(1, 2, 0).clamp(-1, 1)
                .numpy() + 1) / 2
    assert got.shape == (64, 64, 3) and np.abs(got - want).max() <= 1 / 255 + 1e-6
    full = Image.open(io.BytesIO(FullPreview(pipe).png(z)))
    assert full.tobytes() == pipe.decode(z)[0].tobytes()
    builtin = Pipeline(build_tiny(), torch.device("cpu"), "full", watermark=False)
    assert tiny_preview(builtin, folders.found["vae_approx"]) is None
