"""Train a model from a CompVis-style config with PyTorch Lightning.

    python main.py --base configs/shapes/autoencoder-kl-f4.yaml -t --name shapes-vae
    python main.py --resume logs/shapes-vae -t          # continue after an interruption

The config has ``model`` (what to build), ``training`` (parameters of the Lightning wrapper
in ``ldm.lightning``), ``data`` and ``lightning.trainer`` (``pl.Trainer`` arguments, which
the command line overrides). A run lives in ``<logdir>/<name>/``: ``configs/`` (the merged
config, with the run's own flags in it: ``--max_steps``, ``--seed``, ``--precision``,
``--checkpoint_every``, ``--batch_size``, ``--num_workers``, so that ``--resume`` carries on
with them; the machine's flags, ``--gpus``/``--devices``/``--accelerator``/``--num_nodes``,
are given again), ``checkpoints/`` (``last.ckpt`` plus periodic ones), ``metrics.csv``.
"""
import argparse
import csv
import logging
import os
import shlex
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="config.yaml",
                   help="configs, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train")
    p.add_argument("-r", "--resume", default="", help="a run folder or a checkpoint in one")
    p.add_argument("-n", "--name", default="", help="run name (default: time stamp + config)")
    p.add_argument("-l", "--logdir", default="logs", help="folder holding runs")
    p.add_argument("-s", "--seed", type=int, default=None, help="global seed (default 23)")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--accelerator", default=None, help="cpu, gpu, mps or auto")
    p.add_argument("--devices", default=None, help="devices per node, e.g. 1 or 0,1")
    p.add_argument("--gpus", default=None, help="CompVis spelling: e.g. 0, or 0,1")
    p.add_argument("--num_nodes", type=int, default=None)
    p.add_argument("--precision", default=None, help="32, 16-mixed, bf16-mixed")
    p.add_argument("--checkpoint_every", type=int, default=None,
                   help="save a checkpoint every N steps (default: config or 200)")
    p.add_argument("--num_workers", type=int, default=None, help="data loader workers")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. training.learning_rate=1e-4")
    return p.parse_args(argv)


def resolve_run(args):
    """(run folder, checkpoint to resume from or None, config paths)."""
    if args.resume:
        resume = Path(args.resume)
        if not resume.exists():
            raise SystemExit(f"error: --resume {resume} does not exist")
        if resume.is_file() and resume.suffix != ".ckpt":
            raise SystemExit(f"error: --resume {resume} is not a checkpoint: give the run folder "
                             "or a .ckpt in its checkpoints/ folder")
        run = resume.parent.parent if resume.is_file() else resume
        ckpt = resume if resume.is_file() else run / "checkpoints" / "last.ckpt"
        configs = sorted((run / "configs").glob("*.yaml")) + [Path(b) for b in args.base]
        return run, (ckpt if ckpt.exists() else None), configs
    if not args.base:
        raise SystemExit("error: give --base config.yaml (or --resume a run folder)")
    name = args.name or time.strftime("%Y-%m-%dT%H-%M-%S_") + Path(args.base[0]).stem
    return Path(args.logdir) / name, None, [Path(b) for b in args.base]


def is_rank_zero():
    """False in the extra processes Lightning starts for DDP (they re-run this script)."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK"))


def _read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def merge_metrics(first, second, out):
    """``first``'s rows before ``second`` starts (a resumed run repeats the steps after its
    checkpoint), then ``second``'s, under the union of their columns."""
    old, new = _read_rows(first), _read_rows(second)
    steps = [int(r["step"]) for r in new if r.get("step", "").isdigit()]
    if steps:
        old = [r for r in old if not r.get("step", "").isdigit() or int(r["step"]) < min(steps)]
    rows = old + new
    header = list(dict.fromkeys(k for r in rows for k in r))
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)


METRICS_ASIDE = "metrics.before-resume.csv"


def set_metrics_aside(run):
    """Lightning's CSV logger deletes ``metrics.csv`` when it starts: a resumed run keeps its
    history in ``METRICS_ASIDE`` (merged with any left by an earlier resume that ended before
    merging) until ``restore_metrics`` merges it back."""
    metrics, aside = run / "metrics.csv", run / METRICS_ASIDE
    if metrics.exists():
        merge_metrics(aside, metrics, aside)
        metrics.unlink()


def restore_metrics(run):
    aside = run / METRICS_ASIDE
    if aside.exists():
        merge_metrics(aside, run / "metrics.csv", run / "metrics.csv")
        aside.unlink()


# Lightning's warnings that are not true of these runs (each checked), kept out of the log
QUIET = [
    # metrics.csv is set aside and merged back whole on --resume (set_metrics_aside)
    r"Experiment logs directory .* exists and is not empty",
    # a resumed run's own checkpoints/ folder
    r"Checkpoint directory .* exists and is not empty",
    # the frozen autoencoder and text encoder of stage 2 are in eval mode on purpose
    r"Found \d+ module\(s\) in eval mode",
    # no validation data is the configs' choice
    r"Total length of `list` across ranks is zero",
    # Lightning's own use of a deprecated torch API: nothing for a user to do
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
]


def quiet_lightning():
    import warnings
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)

    class NoTips(logging.Filter):  # an advertisement in every run's log
        def filter(self, record):
            return "Tip:" not in record.getMessage()
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(NoTips())


def trainer_kwargs(config, args):
    kw = dict(config.get("lightning", {}).get("trainer", {}) or {})
    if args.gpus is not None:  # CompVis: --gpus 0, means the GPU with index 0
        kw.update(accelerator="gpu", devices=[int(g) for g in str(args.gpus).split(",") if g])
    for key in ("accelerator", "num_nodes"):   # the machine's: given again on each resume
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.devices is not None:
        kw["devices"] = ([int(d) for d in args.devices.split(",") if d] if "," in args.devices
                         else int(args.devices) if args.devices.isdigit() else args.devices)
    steps = kw.get("max_steps") or 0
    if 0 < steps < kw.get("log_every_n_steps", 50):  # a short run logs its metrics too
        kw["log_every_n_steps"] = steps
    return kw


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_lightning()
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise SystemExit('error: training needs PyTorch Lightning, which is not installed: '
                         'pip install -e ".[train]"') from None
    from omegaconf import OmegaConf
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from ldm.lightning import progress_bar, trainer_for
    from ldm.util import instantiate_from_config

    run, ckpt, config_paths = resolve_run(args)
    if not args.train:
        raise SystemExit("nothing to do: pass -t to train")
    if ckpt:  # a truncated or foreign file: one line, before anything is written
        from ldm.checkpoint import CheckpointError, _load_pickle
        try:
            _load_pickle(ckpt)
        except CheckpointError as e:
            raise SystemExit(f"error: cannot resume: {e}") from None
    config = OmegaConf.merge(*[OmegaConf.load(c) for c in config_paths],
                             OmegaConf.from_dotlist(args.overrides))
    # the run's own settings go into its saved config, so that `--resume RUN -t` carries on
    # with them: the same length (and the schedules laid out over it), checkpoints, batches
    for flag, key in (("seed", "lightning.seed"),
                      ("max_steps", "lightning.trainer.max_steps"),
                      ("precision", "lightning.trainer.precision"),
                      ("checkpoint_every", "lightning.checkpoint_every"),
                      ("num_workers", "data.params.num_workers"),
                      ("batch_size", "data.params.batch_size")):
        if getattr(args, flag) is not None:
            OmegaConf.update(config, key, getattr(args, flag), force_add=True)
    pl.seed_everything(config.get("lightning", {}).get("seed", 23), workers=True)
    try:  # a bad option in the config: one line, before anything is written
        model = trainer_for(instantiate_from_config(config.model),
                            **OmegaConf.to_container(config.get("training", {}) or {}))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except (KeyError, TypeError, ImportError, AttributeError) as e:
        raise SystemExit(f"error: the config's model does not build ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}): is --base the whole config (for "
                         "a partial one, give the config it extends first)?") from None
    rank_zero = is_rank_zero()
    if rank_zero:
        (run / "configs").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, run / "configs" / "config.yaml")
        with open(run / "configs" / "commands.txt", "a") as f:  # every start and resume
            command = shlex.join(["main.py", *(sys.argv[1:] if argv is None else argv)])
            f.write(time.strftime("%Y-%m-%dT%H:%M:%S ") + command + "\n")
        set_metrics_aside(run)
    data = instantiate_from_config(config.data)
    every = config.get("lightning", {}).get("checkpoint_every", 200)
    checkpoints = ModelCheckpoint(dirpath=run / "checkpoints", filename="step-{step:06d}",
                                  every_n_train_steps=every, save_last=True, save_top_k=2,
                                  monitor="step", mode="max", auto_insert_metric_name=False,
                                  enable_version_counter=False)  # a resumed run keeps last.ckpt
    kwargs = trainer_kwargs(config, args)
    bars = []
    if kwargs.get("enable_progress_bar", True):
        bars = [progress_bar()]  # a bar on a terminal, plain lines in a log
        kwargs["enable_progress_bar"] = isinstance(bars[0], pl.callbacks.ProgressBar)
    trainer = pl.Trainer(default_root_dir=run, callbacks=[checkpoints, *bars],
                         logger=CSVLogger(run, name="", version=""), **kwargs)
    print(f"run folder: {run}" + (f" (resuming from {ckpt})" if ckpt else ""), flush=True)
    # weights_only: Lightning's checkpoint is loaded by torch's safe unpickler, never running
    # code from it (our own restricted unpickler has vetted the file above)
    try:
        trainer.fit(model, data, ckpt_path=ckpt, weights_only=True)
    except SystemExit:  # Lightning's answer to Ctrl-C: sys.exit(1) after its own clean-up
        if not trainer.interrupted:
            raise
    # the steps after the last every-N checkpoint (to max_steps, or to a Ctrl-C) are kept too
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=False)  # all of it
    if rank_zero:
        restore_metrics(run)
    if trainer.interrupted:
        print(f"interrupted: saved {run / 'checkpoints' / 'last.ckpt'}; "
              f"continue with: python main.py --resume {run} -t", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
