"""Config plumbing shared by the library and scripts (CompVis' ``instantiate_from_config``)."""
import importlib


def get_obj_from_str(string):
    """``"pkg.module.Name"`` -> the object ``Name`` of ``pkg.module``."""
    module, name = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def instantiate_from_config(config, **extra):
    """Build ``config.target(**config.params, **extra)``, the CompVis config schema."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"config has no 'target' key: {config}")
    params = dict(config.get("params", None) or {})
    return get_obj_from_str(config["target"])(**params, **extra)


def count_params(model):
    return sum(p.numel() for p in model.parameters())
