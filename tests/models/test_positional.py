"""spatial_pos_emb: pixel coordinates for the UNet's transformers (ours, off for SD)."""
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_CONFIG, randomize
from ldm.modules.attention import SpatialTransformer, coordinate_features
from ldm.util import instantiate_from_config


def test_coordinate_features_are_relative_positions():
    f = coordinate_features(4, 6)
    assert f.shape == (24, 16) and f.abs().max() <= 1
    assert len({tuple(r.tolist()) for r in f.round(decimals=5)}) == 24   # all pixels differ
    # the same relative place on maps of different sizes gets the same features
    g = coordinate_features(8, 12).reshape(8, 12, 16)
    small = coordinate_features(2, 2).reshape(2, 2, 16)
    assert torch.allclose(coordinate_features(1, 1)[0], coordinate_features(3, 3)[4])
    assert not torch.allclose(small[0, 0], small[1, 1]) and g.shape == (8, 12, 16)


def test_zero_initialised_so_a_checkpoint_without_it_behaves_the_same():
    torch.manual_seed(0)
    plain = randomize(SpatialTransformer(32, 2, 16, context_dim=8))
    with_pos = SpatialTransformer(32, 2, 16, context_dim=8, pos_emb=True)
    missing = with_pos.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["pos_emb.weight", "pos_emb.bias"]
    x, ctx = torch.randn(2, 32, 5, 7), torch.randn(2, 3, 8)
    assert torch.equal(plain(x, ctx), with_pos(x, ctx))
    # once trained, identical inputs at different places give different outputs
    with torch.no_grad():
        with_pos.pos_emb.weight.normal_()
    flat = torch.randn(1, 32, 1, 1).expand(1, 32, 5, 7)
    y = with_pos(flat, ctx[:1])
    assert not torch.allclose(y[..., 0, 0], y[..., 4, 6], atol=1e-3)
    assert torch.allclose(plain(flat, ctx[:1])[..., 0, 0], plain(flat, ctx[:1])[..., 4, 6],
                          atol=1e-5)


def test_random_start_makes_queries_differ_by_place_from_the_first_step():
    torch.manual_seed(0)
    zero = SpatialTransformer(32, 2, 16, context_dim=8, pos_emb="zero")
    rand = SpatialTransformer(32, 2, 16, context_dim=8, pos_emb="random")
    assert not zero.pos_emb.weight.any() and rand.pos_emb.weight.abs().min() > 0
    rand.load_state_dict({k: v for k, v in zero.state_dict().items() if "pos_emb" not in k},
                         strict=False)                     # same network but the start
    with torch.no_grad():                                  # proj_out starts at zero: open it
        for m in (zero, rand):
            m.proj_out.weight.copy_(torch.randn_like(m.proj_out.weight))
    flat, ctx = torch.randn(1, 32, 1, 1).expand(1, 32, 4, 4), torch.randn(1, 3, 8)
    y_zero, y_rand = zero(flat, ctx), rand(flat, ctx)
    assert torch.allclose(y_zero[..., 0, 0], y_zero[..., 3, 3], atol=1e-5)
    assert not torch.allclose(y_rand[..., 0, 0], y_rand[..., 3, 3], atol=1e-3)
    with pytest.raises(ValueError, match="pos_emb must be"):
        SpatialTransformer(32, 2, 16, context_dim=8, pos_emb="learned")


def test_unet_option_adds_keys_only_when_on():
    config = OmegaConf.load(TINY_CONFIG).model.params.unet_config
    keys = instantiate_from_config(config).state_dict().keys()
    assert not any("pos_emb" in k for k in keys)
    config.params.spatial_pos_emb = True
    unet = instantiate_from_config(config)
    assert any(k.endswith("1.pos_emb.weight") for k in unet.state_dict())
    x = torch.randn(1, 4, 12, 20)                        # runs at other sizes too
    out = unet(x, torch.tensor([10]), torch.randn(1, 77, config.params.context_dim))
    assert out.shape == x.shape


def test_stage2_can_start_from_a_checkpoint_without_it(tmp_path):
    pytest.importorskip("pytorch_lightning")
    from ldm.lightning import trainer_for
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.cond_stage_trainable = True
    before = trainer_for(randomize(instantiate_from_config(config.model)))
    torch.save({"state_dict": before.state_dict(), "global_step": 7}, tmp_path / "a.ckpt")
    config.model.params.unet_config.params.spatial_pos_emb = True
    after = trainer_for(instantiate_from_config(config.model), init_ckpt=tmp_path / "a.ckpt")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        c = before.model.get_learned_conditioning(["a red circle", "x"])
        assert torch.equal(after.model.get_learned_conditioning(["a red circle", "x"]), c)
        assert torch.equal(after.model.apply_model(z, t, c), before.model.apply_model(z, t, c))
    # the EMA copies came along too
    assert torch.equal(after.ema_state_dict()["model.diffusion_model.out.2.weight"],
                       before.ema_state_dict()["model.diffusion_model.out.2.weight"])
    # a checkpoint with weights this config lacks is refused
    config.model.params.unet_config.params.spatial_pos_emb = False
    torch.save({"state_dict": after.state_dict()}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="unexpected keys"):
        trainer_for(instantiate_from_config(config.model), init_ckpt=tmp_path / "b.ckpt")


def test_no_diffusers_twin_except_for_timing():
    """diffusers has no counterpart: an exact twin is refused; the timing twin (used by the
    cold-start benchmark) is the same network without the pos_emb layers."""
    pytest.importorskip("diffusers")
    from ldm.compare import to_diffusers
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.unet_config.params.spatial_pos_emb = True
    model = instantiate_from_config(config.model)
    with pytest.raises(ValueError, match="no spatial_pos_emb"):
        to_diffusers(model, config)
    unet = to_diffusers(model, config, drop_pos_emb=True)[0]
    ours = sum(p.numel() for p in model.model.parameters())
    pos = sum(p.numel() for n, p in model.model.named_parameters() if ".pos_emb." in n)
    assert pos > 0 and sum(p.numel() for p in unet.parameters()) == ours - pos
