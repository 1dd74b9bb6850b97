"""Write the key manifest (name and shape per line) of a config's model, built on `meta`.

    python scripts/write_key_manifest.py configs/stable-diffusion/v1-inference.yaml \
        > tests/manifests/sd-v1.txt

tests/models/test_manifest.py compares the committed manifests with the code, so any
drift from the official checkpoint layout shows up in a second without weights.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def manifest(config_path):
    from ldm.pipeline import build_model
    model = build_model(config_path, meta=True)
    return "".join(f"{k} {list(v.shape)}\n" for k, v in model.state_dict().items())


if __name__ == "__main__":
    sys.stdout.write(manifest(sys.argv[1]))
