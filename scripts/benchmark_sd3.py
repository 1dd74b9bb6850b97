"""SD 3's transformer at full size: one step of ours against diffusers' SD3Transformer2DModel
on identical random weights, on this machine.

    python scripts/benchmark_sd3.py                          # SD 3 Medium, 1024x1024, fp32 and bf16
    python scripts/benchmark_sd3.py --config sd3.5_large --dtypes bf16 --size 512

The tests compare every SD 3 path with diffusers on tiny configs; this times what only the
real shapes show: the MMDiT of ``configs/stable-diffusion/<config>.yaml`` with seeded
random weights in Stability's layout (official weights cannot be downloaded here), batch 2
(one image with guidance), at a mid-schedule timestep, the two sides alternating. diffusers'
model holds our tensors where its converter keeps them (``to_diffusers_sd3``-style, loaded
with ``assign``), so two 8 GB fp32 networks are not needed. The text encoders and the
autoencoder are not built (T5-XXL alone is 19.6 GB in fp32).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sd3_medium", help="a config in configs/stable-diffusion")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per side (the best counts)")
    args = p.parse_args(argv)

    import torch
    import diffusers
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from omegaconf import OmegaConf
    from ldm.compare import time_alternating
    from ldm.util import instantiate_from_config

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads")
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / f"{args.config}.yaml")
    net_config = config.model.params.network_config
    for name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        torch.manual_seed(0)
        with torch.device("meta"):
            ours = instantiate_from_config(net_config)
        sd = {}
        g = torch.Generator().manual_seed(0)
        for k, v in ours.state_dict().items():
            if k == "pos_embed":
                sd[k] = torch.zeros(v.shape, dtype=dtype)
            else:
                sd[k] = (torch.randn(v.shape, generator=g) * (0.02 if v.dim() > 1 else 0.01)).to(dtype)
        ours.load_state_dict(sd, assign=True, strict=True)
        ours.eval().requires_grad_(False)
        blocks = ours.joint_blocks
        first = blocks[0].x_block.attn
        dim = ours.x_embedder.proj.out_channels
        with torch.device("meta"):
            theirs = diffusers.SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, num_layers=len(blocks),
                attention_head_dim=dim // first.heads, num_attention_heads=first.heads,
                joint_attention_dim=ours.context_embedder.in_features, caption_projection_dim=dim,
                pooled_projection_dim=ours.y_embedder.mlp[0].in_features, out_channels=16,
                pos_embed_max_size=ours.pos_embed_max_size,
                dual_attention_layers=tuple(i for i, b in enumerate(blocks) if b.x_block.self_attn2),
                qk_norm=None if isinstance(first.ln_q, torch.nn.Identity) else "rms_norm")
        converted = convert_sd3_transformer_checkpoint_to_diffusers(
            {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()})
        theirs.load_state_dict(converted, strict=True, assign=True)
        theirs.eval().requires_grad_(False)
        del converted, sd
        side = args.size // 8
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, side, side, generator=g).to(dtype)
        ctx = torch.randn(2, 77 + 256, 4096, generator=g).to(dtype)
        y = torch.randn(2, 2048, generator=g).to(dtype)
        t = torch.tensor([500.0, 500.0])
        outs = {}

        def run_ours():
            with torch.no_grad():
                outs["ours"] = ours(x, t, ctx, y)

        def run_theirs():
            with torch.no_grad():
                outs["diffusers"] = theirs(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                                           pooled_projections=y).sample
        times, _ = time_alternating({"ours": run_ours, "diffusers": run_theirs}, args.repeats,
                                    warmup=False)
        err = ((outs["ours"].float() - outs["diffusers"].float()).abs().max()
               / outs["diffusers"].float().abs().max()).item()
        best = {k: min(v) for k, v in times.items()}
        print(f"{args.config} {name} {args.size}x{args.size}, batch 2: ours "
              f"{best['ours']:.2f} s, diffusers {best['diffusers']:.2f} s, ratio "
              f"{best['ours'] / best['diffusers']:.2f} (all: ours "
              f"{[round(s, 2) for s in times['ours']]}, diffusers "
              f"{[round(s, 2) for s in times['diffusers']]}); max rel diff {err:.1e}",
              flush=True)
        del ours, theirs, outs


if __name__ == "__main__":
    main()
