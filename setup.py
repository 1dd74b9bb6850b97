from setuptools import find_packages, setup

# Kept as plain literals: tests/test_packaging.py checks environment.yaml agrees with them.
INSTALL_REQUIRES = [
    "torch>=2.1",
    "numpy",
    "omegaconf>=2.1",
    "safetensors>=0.4",
    "tqdm",
    "pillow",
    "ftfy>=6.1",
    "regex",
    "scipy",
    "invisible-watermark>=0.2.0",
]
TRAIN_REQUIRES = ["pytorch-lightning>=2.0"]
# the OpenVINO backend (--backend openvino); the wheel does not depend on torch
OPENVINO_REQUIRES = ["openvino>=2025.1"]
# the HTTP server (scripts/serve.py); imported by ldm.server only
SERVER_REQUIRES = ["fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9"]
TEST_REQUIRES = ["pytest", "diffusers>=0.30", "transformers>=4.40",
                 "torchsde", "peft", "webuiapi", "openai>=1.0"] + TRAIN_REQUIRES + \
    OPENVINO_REQUIRES + SERVER_REQUIRES
# torchsde: the referee for DPM++ SDE; peft: diffusers' LoRA loading, the referee for ours;
# webuiapi, openai: real clients of the server

setup(
    name="latent-diffusion-txt2img",
    version="0.1.0",
    description="Stable Diffusion text-to-image, image-to-image and inpainting, CompVis-compatible, tested on CPU",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm.modules.encoders": ["*.gz", "*.txt"], "ldm.server": ["static/*"]},
    python_requires=">=3.9",
    install_requires=INSTALL_REQUIRES,
    extras_require={"train": TRAIN_REQUIRES, "openvino": OPENVINO_REQUIRES,
                    "server": SERVER_REQUIRES, "test": TEST_REQUIRES},
)
