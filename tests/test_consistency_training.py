"""Latent consistency distillation (``ldm.training.ConsistencyDistillation``,
``ldm.lightning.ConsistencyTrainer``): the few-step student of an exported model, on tiny
configs."""
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import ROOT, TINY_CONFIG, official_layout

pytest.importorskip("pytorch_lightning")
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import main  # noqa: E402

TRAIN = ROOT / "configs" / "tiny" / "train-tiny.yaml"


def test_the_teachers_step_and_the_boundary_condition():
    """One DDIM step with the true noise goes exactly to the noised data at s; the grid's
    pairs are 20 timesteps apart; f is the estimate of x0 but for c_skip (tiny off t = 0)."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule
    from ldm.training import ConsistencyDistillation
    a = torch.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012), 0).float()
    cd = ConsistencyDistillation(a, guidance=(2, 6))
    t, s, scale = cd.draw(256, "cpu")
    assert ((t - s) == 20).all() and t.min() >= 39 and t.max() <= 999 and s.min() >= 19
    assert (scale >= 2).all() and (scale <= 6).all()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, s = torch.tensor([999, 499, 259, 39]), torch.tensor([979, 479, 239, 19])
    x_t = a[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - a[t]).sqrt().view(-1, 1, 1, 1) * eps
    x_s = a[s].sqrt().view(-1, 1, 1, 1) * x0 + (1 - a[s]).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(cd.ddim_step(x_t, t, s, eps), x_s, atol=1e-5)
    f = cd.f(x_t, t, eps)
    assert torch.allclose(f, x0, atol=1e-3) and not torch.equal(f, x0)
    with pytest.raises(ValueError, match="guidance"):
        ConsistencyDistillation(a, guidance=(0.5, 3))


def _student(tmp_path, teacher_path, steps):
    config = tmp_path / "student.yaml"
    config.write_text(f"""
model:
  params:
    cond_stage_trainable: false
    unet_config:
      params:
        time_cond_proj_dim: 8
training:
  distill_from: {teacher_path}
  guidance: [2.0, 6.0]
  learning_rate: 1.0e-3
  p_uncond: 0.0
  scale_by_std: false
lightning:
  trainer:
    max_steps: {steps}
sampling:
  sampler: lcm
  steps: 4
  scale: 4.0
""")
    return config


def test_a_student_starts_as_its_teacher_learns_and_exports_a_guidance_embedded_lcm(tmp_path):
    """The student of an exported tiny model: at step 0 its UNet predicts exactly as the
    teacher's whatever guidance it is given (the embedding's projection zero), the target
    network and EMA equal it, and the text encoder and autoencoder are the teacher's. The
    loss pulls the student to a held target. A 40-step run through main.py: only the UNet
    changed; the export loads as an LCM with a guidance embedding (LCM, 4 steps by
    default) and makes images. (Whether it learns to make pictures in 4 steps is the
    built-in fast model's evaluation: models/ldm/shapes-fast/README.md.)"""
    from conftest import build_tiny
    from ldm.lightning import ConsistencyTrainer, trainer_for
    from ldm.util import instantiate_from_config
    teacher = build_tiny(3)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in official_layout(teacher).items()}, path)
    (tmp_path / "config.yaml").write_text(TINY_CONFIG.read_text())
    student = _student(tmp_path, path, 40)
    config = OmegaConf.merge(OmegaConf.load(TINY_CONFIG), OmegaConf.load(TRAIN),
                             OmegaConf.load(student))
    trainer = trainer_for(instantiate_from_config(config.model),
                          **OmegaConf.to_container(config.training))
    assert isinstance(trainer, ConsistencyTrainer)
    model = trainer.model
    from ldm.modules.diffusionmodules.util import guidance_embedding
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 20])
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        want = teacher.apply_model(x, t, ctx)
        for scale in (1.0, 7.0):
            got = model.apply_model(x, t, {"crossattn": ctx,
                                           "guidance": guidance_embedding([scale] * 2, 8)})
            assert want.abs().max() > 0.1 and torch.allclose(got, want, atol=1e-5)
    sd, target = model.model.state_dict(), trainer.target_net.state_dict()
    assert all(torch.equal(sd[k], target[k]) for k in sd)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in model.state_dict().items()
               if k.startswith(("cond_stage_model.", "first_stage_model.")))

    # the loss pulls the student towards a held target: 30 steps on one batch (the same
    # draws each time; the target frozen) take it below half
    batch = next(iter(instantiate_from_config(config.data).train_dataloader()))
    trainer.distill.target_decay = 1.0
    opt = torch.optim.Adam([p for p in model.model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for _ in range(30):
        torch.manual_seed(5)
        loss = trainer._loss(batch, drop_captions=False)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None for p in model.cond_stage_model.parameters())

    args = ["--base", str(TINY_CONFIG), str(TRAIN), str(student), "-t", "--logdir",
            str(tmp_path), "--name", "lcm", "--max_steps", "40"]
    assert main.main(args) == 0
    import export_model
    out = tmp_path / "export"
    export_model.main(["--run", str(tmp_path / "lcm"), "--out", str(out), "--dtype",
                       "float32"])
    from ldm.checkpoint import load_state_dict_file
    exported = load_state_dict_file(out / "model.safetensors")
    before = official_layout(teacher)
    changed = {k for k, v in exported.items() if k in before and not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed)
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in exported
    from ldm.pipeline import Pipeline
    pipe = Pipeline.load(out / "model.safetensors", device="cpu", safety=False)
    assert pipe.model.guidance_embedded
    request = pipe.request("txt2img", ["a red circle"], [1])
    assert (request.sampler, request.steps, request.scale) == ("lcm", 4, 4.0)
    s = pipe.generate("a red circle", [1], height=32, width=32, progress=False)[0]
    assert s.image.size == (32, 32) and s.parameters["sampler"] == "lcm"


def test_a_student_without_the_embedding_or_with_a_trainable_text_encoder_is_refused(
        tmp_path):
    from conftest import build_tiny
    from ldm.lightning import trainer_for
    from ldm.util import instantiate_from_config
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in official_layout(build_tiny()).items()}, path)
    (tmp_path / "config.yaml").write_text(TINY_CONFIG.read_text())
    config = OmegaConf.merge(OmegaConf.load(TINY_CONFIG), OmegaConf.load(TRAIN))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        trainer_for(instantiate_from_config(config.model), distill_from=str(path))
    config.model.params.unet_config.params.time_cond_proj_dim = 8
    with pytest.raises(ValueError, match="cond_stage_trainable: false"):
        trainer_for(instantiate_from_config(config.model), distill_from=str(path))
