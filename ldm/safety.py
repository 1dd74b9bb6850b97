"""The CLIP-based safety checker SD v1 ships (``CompVis/stable-diffusion-safety-checker``).

A CLIP ViT-L/14 image encoder embeds the image; its cosine similarity to 17 "concept" and 3
"special care" embeddings, minus a per-concept threshold, flags an image when any concept
score is positive (a special-care hit lowers every threshold by 0.01). Flagged images are
replaced by a black image before anything is written. Keys mirror the published weights
(``vision_model.vision_model.*``, ``visual_projection``, ``concept_embeds`` ...), which are
loaded from a local file or the Hugging Face cache when present, never downloaded.
"""
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.modules.encoders.clip import CLIPVisionConfig, CLIPVisionModel

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
LOCAL_DIR = ROOT / "models" / "safety_checker"
HF_REPO = "models--CompVis--stable-diffusion-safety-checker"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.ckpt")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SafetyChecker(nn.Module):
    def __init__(self, vision: CLIPVisionConfig = None, projection_dim=768, n_concepts=17,
                 n_special=3):
        super().__init__()
        vision = vision or CLIPVisionConfig()
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(n_concepts, projection_dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(n_special, projection_dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(n_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(n_special), requires_grad=False)

    @property
    def image_size(self):
        return self.vision_model.config.image_size

    def preprocess(self, images):
        """PIL images -> CLIP input: shortest side resized (bicubic), centre crop, normalised."""
        s = self.image_size
        out = []
        for im in images:
            im = im.convert("RGB")
            w, h = im.size
            k = s / min(w, h)
            im = im.resize((max(s, round(w * k)), max(s, round(h * k))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - s) // 2, (h - s) // 2
            out.append(np.asarray(im.crop((left, top, left + s, top + s)), np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @staticmethod
    def _cosine(a, b):
        return nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).T

    @torch.no_grad()
    def scores(self, clip_input):
        """(concept scores [B, 17], special-care scores [B, 3]); > 0 means a hit."""
        p = next(self.parameters())
        embeds = self.visual_projection(self.vision_model(clip_input.to(p.device, p.dtype))).float()
        special = self._cosine(embeds, self.special_care_embeds.float()) - self.special_care_embeds_weights.float()
        adjustment = (special > 0).any(dim=1, keepdim=True).float() * 0.01
        concept = self._cosine(embeds, self.concept_embeds.float()) - self.concept_embeds_weights.float()
        return concept + adjustment, special

    def forward(self, clip_input):
        """True per image that is flagged."""
        return (self.scores(clip_input)[0] > 0).any(dim=1)

    def check_images(self, images):
        """(images with flagged ones replaced by black, flags)."""
        flags = self(self.preprocess(images)).tolist()
        out = [Image.new("RGB", im.size) if bad else im for im, bad in zip(images, flags)]
        if any(flags):
            log.warning("%d image(s) flagged by the safety checker were replaced by black ones",
                        sum(flags))
        return out, flags


def find_safety_checker_weights():
    """The first weights file found in models/safety_checker/ or the Hugging Face cache."""
    folders = [LOCAL_DIR]
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get(
        "HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    folders += sorted((hub / HF_REPO / "snapshots").glob("*"), reverse=True)
    for folder in folders:
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def vision_config_from(path):
    """CLIPVisionConfig from a transformers config.json beside the weights, else ViT-L/14's."""
    cfg = Path(path).parent / "config.json"
    if not cfg.is_file():
        return CLIPVisionConfig(), 768
    data = json.loads(cfg.read_text())
    vision = data.get("vision_config", {})
    fields = CLIPVisionConfig.__dataclass_fields__
    return (CLIPVisionConfig(**{k: v for k, v in vision.items() if k in fields}),
            data.get("projection_dim", 768))


def normalize_safety_keys(sd):
    """Published weights read ``vision_model.vision_model.*``; transformers 5 saves the inner
    vision model without its ``vision_model.`` level. Accept both."""
    if any(k.startswith("vision_model.vision_model.") for k in sd):
        return sd
    return {("vision_model." + k if k.startswith("vision_model.") else k): v for k, v in sd.items()}


def load_safety_checker(path=None, device="cpu"):
    """A SafetyChecker with its weights, or None when no weights are found (path=None)."""
    from ldm.checkpoint import load_model_weights, load_state_dict_file
    if path is None:
        path = find_safety_checker_weights()
        if path is None:
            return None
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no safety checker weights ({', '.join(WEIGHT_FILES)}) in {path}")
        path = found[0]
    vision, projection_dim = vision_config_from(path)
    sd = normalize_safety_keys(load_state_dict_file(path))
    n_concepts = sd["concept_embeds"].shape[0] if "concept_embeds" in sd else 17
    n_special = sd["special_care_embeds"].shape[0] if "special_care_embeds" in sd else 3
    with torch.device("meta"):
        checker = SafetyChecker(vision, projection_dim, n_concepts, n_special)
    load_model_weights(checker, sd, source=str(path))
    return checker.eval().to(device)
