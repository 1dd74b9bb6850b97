"""Few-step distillates told by their file names: SDXL-Lightning (ByteDance, Lin et al.
2024) and Hyper-SD (ByteDance, Ren et al. 2024), as whole checkpoints, UNets (``--unet``)
or LoRAs (``--lora``). Their weights have the keys of the model they were distilled from,
so only the name the authors gave them tells what sampling they were trained for (the
number of steps is in it: ``sdxl_lightning_4step_lora.safetensors``,
``Hyper-SDXL-8steps-CFG-lora.safetensors``). When one is loaded, its sampling becomes the
run's defaults; flags given explicitly still win.

- SDXL-Lightning N-step (2, 4, 8): Euler on trailing timesteps, N steps, no guidance (the
  authors' diffusers recipe: ``EulerDiscreteScheduler(timestep_spacing="trailing")``,
  ``guidance_scale=0``). The 1-step model predicts the clean image ("x0"), which no noise
  model here reads yet: refused.
- Hyper-SD N-step LoRAs (SDXL and SD 1.5; 1, 2, 4, 8): DDIM on trailing timesteps, N steps,
  no guidance; the "CFG" LoRAs (8 and 12 steps) keep guidance, 5.0 (the authors' range is
  5-8). The 1-step UNet was made for TCD at timestep 800, not run here yet: refused.

- LCM-LoRA (Luo et al. 2023, "lcm-lora-sdv1-5", "lcm-lora-sdxl", "LCM_LoRA_Weights_SD15"...)
  and LCM-distilled checkpoints named so: the LCM sampler on its own timesteps (from the
  50-step distillation schedule), 4 steps, no guidance (the authors' diffusers recipe:
  ``LCMScheduler``, 4 steps, guidance 1; LCM-LoRA takes 1-2).
- TCD LoRAs (Zheng et al. 2024, "TCD-SD15-LoRA", "TCD-SDXL-LoRA"): the TCD sampler on the
  same timesteps, 4 steps, no guidance, gamma (eta) 0.3 (the authors' recipe).
An LCM checkpoint with a guidance embedding is told by its keys, not its name
(``families.sd1``: ``time_embedding.cond_proj``).

SDXL-Turbo and SD-Turbo are variants with their own configs (``sdxl.py``, ``sd2.py``).
Nothing here imports torch or any other ``ldm`` module.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

LIGHTNING = re.compile(r"lightning\D{0,3}?(\d+)[-_ ]?steps?")
CONSISTENCY = re.compile(r"(?<![a-z])(lcm|tcd)(?![a-z])")
HYPER = re.compile(r"hyper[-_ ]?sd(?:xl|15|1\.5)?\D{0,3}?(\d+)[-_ ]?steps?")
SAMPLER_LABELS = {"euler": "Euler", "ddim": "DDIM", "lcm": "LCM", "tcd": "TCD"}


@dataclass(frozen=True)
class Distillate:
    """A few-step distillate: what it is, the file that said so, the sampling defaults it
    needs (``sampler``, ``steps``, ``scale``, ``timestep_spacing``), or why it cannot run."""
    label: str
    file: str
    defaults: dict = field(default_factory=dict)
    refusal: str = None

    @property
    def phrase(self):
        """One line for the log: what the file is and the sampling it brings."""
        d = self.defaults
        guidance = "no guidance" if d["scale"] == 1 else f"guidance {d['scale']:g}"
        where = (" on trailing timesteps" if d.get("timestep_spacing") == "trailing" else
                 " on its own timesteps")
        steps = f"{d['steps']} step" + ("s" if d["steps"] != 1 else "")
        return (f"{self.file} is {self.label}: {SAMPLER_LABELS[d['sampler']]}{where}, "
                f"{steps}, {guidance} (sampling flags given still win)")


def _few_step(sampler, steps, scale):
    return {"sampler": sampler, "steps": steps, "scale": scale,
            "timestep_spacing": "trailing"}


def of_name(path):
    """The ``Distillate`` a file called ``path`` is, or None."""
    name = Path(str(path)).name
    low = name.lower()
    found = LIGHTNING.search(low)
    if found:
        steps = int(found.group(1))
        label = f"SDXL-Lightning {steps}-step"
        if steps == 1 or "x0" in low:
            return Distillate(label, name, refusal=(
                f"{name} is {label}, which predicts the clean image (x0): not run here "
                "yet; use SDXL-Lightning's 2-, 4- or 8-step model or LoRA"))
        return Distillate(label, name, _few_step("euler", steps, 1.0))
    found = CONSISTENCY.search(low)
    if found and not HYPER.search(low):
        kind = found.group(1)
        what = "LoRA" if "lora" in low else "model"
        label = f"{kind.upper()}-distilled {what}" if what == "model" else f"{kind.upper()}-LoRA"
        return Distillate(label, name, {"sampler": kind, "steps": 4, "scale": 1.0})
    found = HYPER.search(low)
    if found:
        steps = int(found.group(1))
        cfg = "cfg" in low
        label = f"Hyper-SD {steps}-step" + (" CFG" if cfg else "")
        if "unet" in low and steps == 1:
            return Distillate(label + " UNet", name, refusal=(
                f"{name} is Hyper-SD's 1-step UNet, made for the TCD sampler at timestep "
                "800: not run here yet; use a Hyper-SD N-step LoRA (--lora)"))
        return Distillate(label, name, _few_step("ddim", steps, 5.0 if cfg else 1.0))
    return None


def find(paths):
    """The first distillate among the files ``paths`` (None entries skipped), or None."""
    for path in paths:
        if path is not None:
            found = of_name(path)
            if found is not None:
                return found
    return None
