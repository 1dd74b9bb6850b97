"""What happens to an image after decoding: safety check, watermark, PNG metadata, files."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.image_io import (ImageInputError, OutputError, Outputs, check_output_folder, load_image,
                          make_grid, read_parameters, save_numbered, save_png)
from ldm.safety import SafetyChecker, load_safety_checker
from ldm.watermark import WATERMARK, can_watermark, put_watermark, read_watermark


def smooth_image(size, seed=0):
    """A photo-like test image: blurred noise around mid grey (no saturated areas)."""
    from PIL import ImageFilter
    rng = np.random.default_rng(seed)
    noise = rng.integers(70, 190, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2))


def test_watermark_512_decodes_back():
    image = smooth_image((512, 512))
    marked, note = put_watermark(image)
    assert note == WATERMARK and read_watermark(marked) == WATERMARK
    diff = np.abs(np.asarray(marked, np.int16) - np.asarray(image, np.int16))
    assert diff.mean() < 2.0 and diff.max() > 0  # invisible, but there
    assert read_watermark(image) != WATERMARK


def test_watermark_refused_for_small_images():
    assert not can_watermark(256, 256) and not can_watermark(64, 64)
    assert can_watermark(512, 512) and can_watermark(320, 256)
    image = smooth_image((64, 64))
    out, note = put_watermark(image)
    assert note.startswith("none") and out is image


def test_png_parameters_round_trip_and_never_overwrite(tmp_path):
    params = {"prompt": "a red circle ✓", "negative_prompt": "blue", "seed": 43, "steps": 20,
              "sampler": "plms", "scale": 7.5, "eta": 0.0, "width": 64, "height": 64}
    image = smooth_image((64, 64))
    path = save_png(image, tmp_path / "a.png", params)
    assert read_parameters(path) == params
    with Image.open(path) as im:
        assert "Seed: 43" in im.text["parameters"] and "Negative prompt: blue" in im.text["parameters"]
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_png(smooth_image((64, 64), 1), path, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_numbering_continues_after_what_is_there(tmp_path):
    (tmp_path / "00007.png").write_bytes(b"not ours")
    (tmp_path / "notes.txt").write_text("x")
    first = save_numbered(smooth_image((32, 32)), tmp_path, "{:05}.png")
    second = save_numbered(smooth_image((32, 32)), tmp_path, "{:05}.png")
    assert (first.name, second.name) == ("00008.png", "00009.png")
    assert (tmp_path / "00007.png").read_bytes() == b"not ours"


def test_stray_numbered_files_do_not_move_the_numbering(tmp_path):
    for name in ("123.png", "0001.png", "000099.png", "00041.jpg", "x00050.png", "00007.png"):
        (tmp_path / name).write_bytes(b"not ours")
    assert save_numbered(smooth_image((8, 8)), tmp_path, "{:05}.png").name == "00008.png"
    (tmp_path / "100000.png").write_bytes(b"ours, past 99999")
    assert save_numbered(smooth_image((8, 8)), tmp_path, "{:05}.png").name == "100001.png"
    assert save_numbered(smooth_image((8, 8)), tmp_path, "grid-{:04}.png").name == "grid-0000.png"


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="--outdir"):
        check_output_folder(blocker / "sub")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="--outdir"):
            check_output_folder(ro / "samples")


def test_output_folders_are_made_by_the_first_file_only(tmp_path):
    out = Outputs(tmp_path / "a" / "b").check()
    assert list(tmp_path.iterdir()) == [] and out.written == []
    path = out.save_numbered(smooth_image((8, 8)), "{:05}.png", {"seed": 1}, "samples")
    assert path == tmp_path / "a" / "b" / "samples" / "00000.png" and out.written == [path]
    assert read_parameters(path) == {"seed": 1}


def test_files_get_the_usual_permissions(tmp_path):
    """Not the temp file's 0600: 0666 less the umask, as any other program's output."""
    old = os.umask(0o022)
    try:
        path = save_png(smooth_image((8, 8)), tmp_path / "a.png")
        os.umask(0o077)
        private = save_png(smooth_image((8, 8)), tmp_path / "b.png")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777, private.stat().st_mode & 0o777) == (0o644, 0o600)


def test_ctrl_c_while_a_file_is_written_finishes_it_first(tmp_path, monkeypatch):
    """SIGINT during the write: the file is completed and linked, then KeyboardInterrupt."""
    import signal
    import ldm.image_io as image_io
    real = image_io._pnginfo

    def interrupted(parameters):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at once, handled after the write
        return real(parameters)
    monkeypatch.setattr(image_io, "_pnginfo", interrupted)
    out = Outputs(tmp_path)
    # as in a terminal (a test run in a background job inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            out.save_numbered(smooth_image((8, 8)), "{:05}.png", {"seed": 3})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out.written == [tmp_path / "00000.png"]
    assert read_parameters(tmp_path / "00000.png") == {"seed": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.png"]  # no temp file


def test_grid_layout():
    images = [Image.new("RGB", (8, 8), (255, 0, 0))] * 5
    grid = make_grid(images, 2)
    assert grid.size == (2 * 10 + 2, 3 * 10 + 2)
    a = np.asarray(grid)
    assert (a[2:10, 2:10] == [255, 0, 0]).all() and (a[0:2] == 0).all()
    assert (a[22:30, 12:20] == 0).all()  # the sixth cell is empty


def test_load_image_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ImageInputError, match="cannot read"):
        load_image(bad)
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "missing.png")
    save_png(smooth_image((16, 16)), tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (16, 16)


# ----------------------------------------------------------------------------- safety checker

def tiny_vision_kwargs():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)


def test_safety_checker_matches_diffusers(tmp_path):
    """Same weights in diffusers' StableDiffusionSafetyChecker: same embeddings, same flags."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from safetensors.torch import save_file
    from transformers import CLIPConfig

    torch.manual_seed(0)
    vision = tiny_vision_kwargs()
    config = CLIPConfig(vision_config=dict(vision, hidden_act="quick_gelu"),
                        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4), projection_dim=16)
    theirs = StableDiffusionSafetyChecker(config).eval()
    images = [Image.new("RGB", (48, 40), colour) for colour in
              ((250, 20, 20), (20, 250, 20), (20, 20, 250), (250, 250, 20), (20, 250, 250), (128, 128, 128))]
    ours_tmp = SafetyChecker(__import__("ldm.modules.encoders.clip", fromlist=["x"]).CLIPVisionConfig(**vision), 16)
    clip_input = ours_tmp.preprocess(images)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        embeds = theirs.visual_projection(theirs.vision_model(clip_input)[1])
        # concept vectors near half of the images, thresholds in between: some flagged
        theirs.concept_embeds.copy_(torch.cat([embeds[:3], torch.randn(14, 16)]))
        unit = torch.nn.functional.normalize(embeds, dim=-1)
        cos = unit @ unit[:3].T                      # [6 images, 3 concepts]
        others = cos[3:].max(0).values               # images 3-5 stay below every threshold
        theirs.concept_embeds_weights.fill_(2.0)     # the 14 random concepts never fire
        theirs.concept_embeds_weights[:3] = (1 + others) / 2
        theirs.special_care_embeds.copy_(unit[:1] .expand(3, 16))
        theirs.special_care_embeds_weights.fill_(0.999)  # image 0 gets the special-care shift
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(config.to_json_string())

    ours = load_safety_checker(tmp_path)
    with torch.no_grad():
        ours_embeds = ours.visual_projection(ours.vision_model(clip_input))
    assert torch.allclose(ours_embeds, embeds, atol=1e-5)
    _, their_flags = theirs(clip_input=clip_input, images=np.zeros((6, 8, 8, 3)))
    flags = ours(clip_input).tolist()
    assert flags == list(their_flags) == [True, True, True, False, False, False]
    out, flags2 = ours.check_images(images)
    assert flags2 == flags
    for im, o, bad in zip(images, out, flags):
        assert (np.asarray(o).max() == 0) if bad else (o is im)


def test_no_safety_weights_means_none(tmp_path, monkeypatch):
    import ldm.safety as safety
    monkeypatch.setattr(safety, "LOCAL_DIR", tmp_path / "none")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert safety.find_safety_checker_weights() is None
    assert load_safety_checker() is None
