"""What a model family is (``Family``) and what detection finds (``Detected``)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Family:
    """One generation of models: what recognises it, its configs, its defaults, the shapes
    of its parts and add-ons."""
    name: str                    # short id ("sd1")
    label: str                   # for people: "Stable Diffusion 1.x"
    configs: dict                # variant -> config path under configs/
    match: Callable              # {key: shape} -> variant or None
    match_folder: Callable       # (model_index, unet config, scheduler config) -> variant or None
    # sampling defaults that differ from CompVis' (``ldm.request.ModelInfo.default``); a
    # config's own ``sampling:`` section wins over them
    defaults: dict = field(default_factory=dict)
    prefixes: dict = field(default_factory=dict)   # part -> key prefix in a single file
    native_size: int = 512
    prediction: str = "eps"      # what the UNet predicts: "eps" or "v"
    vae_scale: float = 0.18215   # latents = (posterior - shift) * scale
    vae_shift: float = 0.0
    text_width: int = 768        # a textual-inversion vector's width
    lora_prefixes: tuple = ()    # kohya-ss key prefixes of its LoRAs
    # variants whose prediction type the keys cannot tell: {variant: {prediction: variant}},
    # settled after loading by one UNet call (``noise_model.fitting_prediction``)
    prediction_variants: dict = field(default_factory=dict)
    # variants a single file's name tells when its keys cannot: {variant: {word: variant}}
    # (SD-Turbo is SD 2.1-base's keys; "sd_turbo.safetensors")
    name_variants: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)   # variant -> its name ("SD 3.5 Large")

    def named_variant(self, variant, file_name):
        """The variant a file called ``file_name`` with the keys of ``variant`` is."""
        name = file_name.lower()
        for word, named in self.name_variants.get(variant, {}).items():
            if word in name:
                return named
        return variant

    def config(self, variant):
        return CONFIGS / self.configs[variant]


@dataclass(frozen=True)
class Detected:
    """A checkpoint's family and variant (a key of ``family.configs``)."""
    family: Family
    variant: str

    @property
    def config(self):
        return self.family.config(self.variant)

    @property
    def phrase(self):
        """What it is, for a message: "an SD 1.x inpainting checkpoint (config ...)"."""
        if self.variant in self.family.labels:
            return (f"an {self.family.labels[self.variant]} checkpoint, whose config is "
                    f"{self.config.relative_to(CONFIGS.parent)} (chosen by itself when "
                    f"--config is not given)")
        kind = {"txt2img": "", "v": "v-prediction ", "turbo": "Turbo ", "lcm": "LCM ",
                "zero-snr": "zero-terminal-SNR ", "x4-upscaler": "x4 upscaler "}.get(self.variant, f"{self.variant} ")
        return (f"a {self.family.label} {kind}checkpoint, whose config is "
                f"{self.config.relative_to(CONFIGS.parent)} (chosen by itself when --config "
                f"is not given)")
