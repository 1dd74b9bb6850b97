"""The shipped training recipes' losses on a fixed seed, for a few optimiser steps at points
of each run where its options (phases, decoys, the anchor, replay, masks) are in force.

``tests/data/recipe_losses.json`` holds the figures this gave before the trainer was split
into its parts (``ldm/training``); ``test_training.py`` checks that the recipes still give
them. The inpainting recipe's were recorded again when the recipe itself changed (its
loss-weight cap and box masks, run inp-s2; then its first convolution's learning-rate
multiplier, run inp-s3); the text-to-image recipe's are the originals. ``python tests/recipe_losses.py --record`` rewrites the file (only when a recipe's
results are meant to change)."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "recipe_losses.json"
RECIPES = {  # recipe: the progress points (fractions of the run) to take steps at
    "configs/shapes/txt2img-shapes.yaml": [0.0, 0.3, 0.5, 0.7, 0.95],
    "configs/shapes/inpainting-shapes.yaml": [0.0, 0.5, 0.95],
}
STEPS = 2          # optimiser steps at each point
BATCH = 4          # fresh images a step (the recipes' replay multiplies it)


def recipe_losses(recipe):
    """[loss, ...]: STEPS optimiser steps at each of the recipe's progress points, from one
    seed, with the recipe's model and training section (the batch made smaller)."""
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf
    from ldm.lightning import trainer_for
    from ldm.util import instantiate_from_config
    torch.manual_seed(0)
    config = OmegaConf.load(ROOT / recipe)
    config.data.params.train.params.length = 1000
    config.training.schedule_steps = config.lightning.trainer.max_steps  # no Lightning here
    if "init_from" in config.training:
        config.training.init_from = str(ROOT / config.training.init_from)
    model = trainer_for(instantiate_from_config(config.model),
                        **OmegaConf.to_container(config.training))
    dataset = instantiate_from_config(config.data.params.train)
    [optimizers], [scheduler] = model.configure_optimizers()
    losses, step, index = [], 0, 0
    for progress in RECIPES[recipe]:
        model.progress = lambda: progress   # where in the run (the schedules follow it)
        for _ in range(STEPS):
            items = [dataset[index + i] for i in range(BATCH)]
            index += BATCH
            batch = torch.utils.data.default_collate(items)
            loss = model._loss(batch, drop_captions=True)
            optimizers.zero_grad()
            loss.backward()
            optimizers.step()
            scheduler["scheduler"].step()
            model.on_train_batch_end()
            losses.append(loss.item())
            step += 1
    return losses


def main(argv):
    if argv == ["--compare"]:
        recorded = json.loads(RECORD.read_text())
        for recipe in RECIPES:
            print(recipe, recipe_losses(recipe) == recorded[recipe])
        return
    if argv != ["--record"]:
        raise SystemExit("usage: python tests/recipe_losses.py --record | --compare")
    figures = {recipe: recipe_losses(recipe) for recipe in RECIPES}
    RECORD.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
