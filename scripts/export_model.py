"""Turn a stage-2 training run into an inference model folder.

    python scripts/export_model.py --run logs/shapes-ldm --out models/ldm/shapes

Writes OUT/model.safetensors (EMA weights, official key layout, fp16 by default) and
OUT/config.yaml (the run's model config with the learned scale_factor and the text encoder
frozen), loadable by ``txt2img.py --ckpt OUT/model.safetensors``.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def lineage(ckpt):
    """The runs a checkpoint descends from, oldest first: each run's checkpoint, step, training
    parameters and recorded commands, following ``training.init_ckpt`` (then
    ``training.first_stage_ckpt``) back to a checkpoint outside any run folder."""
    from omegaconf import OmegaConf
    from ldm.checkpoint import _load_pickle
    chain, seen = [], set()
    while ckpt and Path(ckpt).is_file() and Path(ckpt).resolve() not in seen:
        ckpt = Path(ckpt)
        seen.add(ckpt.resolve())
        entry = {"checkpoint": str(ckpt)}
        if ckpt.suffix == ".ckpt":
            entry["global_step"] = int(_load_pickle(ckpt).get("global_step", -1))
        config_path = ckpt.parent.parent / "configs" / "config.yaml"
        if ckpt.parent.name != "checkpoints" or not config_path.is_file():
            chain.append(entry)
            break
        training = OmegaConf.to_container(OmegaConf.load(config_path).get("training", {}) or {})
        entry["training"] = training
        commands = config_path.parent / "commands.txt"
        if commands.is_file():
            entry["commands"] = commands.read_text().splitlines()
        chain.append(entry)
        ckpt = (training.get("init_ckpt") or training.get("init_from")
                or training.get("distill_from") or training.get("first_stage_ckpt"))
    return chain[::-1]


def export(run, out, dtype="float16", ckpt=None, decoder=None):
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.checkpoint import load_state_dict_file
    from ldm.lightning import TRAINING_ONLY, DiffusionTrainer
    from ldm.util import instantiate_from_config

    run, out = Path(run), Path(out)
    config = OmegaConf.load(run / "configs" / "config.yaml")
    ckpt = Path(ckpt) if ckpt else run / "checkpoints" / "last.ckpt"
    model = instantiate_from_config(config.model)
    trainer = DiffusionTrainer(model, ema_decay=0.999, scale_by_std=True)
    sd = load_state_dict_file(ckpt)
    # the frozen anchor (training.anchor_start), a distillation's teacher and target
    # network are training state, not the model
    sd = {k: v for k, v in sd.items() if not k.startswith(TRAINING_ONLY)}
    trainer.load_state_dict(sd, strict=True)
    weights = trainer.ema_state_dict()
    scale = float(sd["scale_factor"])
    if decoder:  # a decoder-only fine-tune of the same autoencoder (encoder unchanged)
        tuned = load_state_dict_file(decoder)
        for key in list(weights):
            if key.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")):
                weights[key] = tuned["model." + key[len("first_stage_model."):]]
        for key in weights:
            if key.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv.")):
                if not torch.equal(weights[key], tuned["model." + key[len("first_stage_model."):]]):
                    raise SystemExit(f"error: {decoder} has another encoder ({key} differs): "
                                     "the diffusion model's latent space would not match")

    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    save_file({k: v.to(torch_dtype).contiguous() for k, v in weights.items()},
              out / "model.safetensors", metadata={"scale_factor": str(scale)})
    inference = OmegaConf.create({"model": OmegaConf.to_container(config.model)})
    if config.get("sampling"):  # the model's own sampling defaults, e.g. its guidance scale
        inference.sampling = config.sampling
    inference.model.params.scale_factor = scale
    inference.model.params.cond_stage_trainable = False
    OmegaConf.save(inference, out / "config.yaml")
    chain = lineage(ckpt)  # the last entry is ckpt itself, with its step
    record = {"run": str(run), "checkpoint": ckpt.name,
              "global_step": chain[-1].get("global_step"),
              "data": OmegaConf.to_container(config.data), "training": OmegaConf.to_container(
                  config.get("training", {})), "scale_factor": scale, "dtype": dtype,
              "decoder": str(decoder) if decoder else None,
              "lineage": chain, "decoder_lineage": lineage(decoder) if decoder else None}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out / "model.safetensors", scale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the training run folder (main.py --name)")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--ckpt", default=None, help="a checkpoint of the run (default: last.ckpt)")
    p.add_argument("--decoder", default=None,
                   help="checkpoint of a decoder-only fine-tune of the run's autoencoder")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    args = p.parse_args(argv)
    path, scale = export(args.run, args.out, args.dtype, args.ckpt, args.decoder)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), scale_factor {scale:.5f}")


if __name__ == "__main__":
    main()
