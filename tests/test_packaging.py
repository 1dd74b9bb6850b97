"""setup.py and environment.yaml list the same dependencies; importing ldm stays light."""
import ast
import subprocess
import sys

import yaml

from conftest import ROOT


def _setup_lists():
    tree = ast.parse((ROOT / "setup.py").read_text())
    lists = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.BinOp)):
            name = node.targets[0].id
            value = node.value
            while isinstance(value, ast.BinOp):   # [literal list] + OTHER + ...
                value = value.left
            lists[name] = [ast.literal_eval(e) for e in value.elts]
    return lists


def test_environment_yaml_matches_setup_py():
    lists = _setup_lists()
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert [p for p in pip if p != "-e ."] == lists["INSTALL_REQUIRES"] + lists["TRAIN_REQUIRES"]


def test_importing_ldm_for_inference_needs_no_lightning_or_diffusers():
    code = ("import sys; import ldm.pipeline, ldm.models.diffusion.ddpm, ldm.checkpoint, "
            "ldm.models.diffusion.ddim, ldm.models.diffusion.plms\n"
            "bad = [m for m in ('pytorch_lightning', 'lightning', 'diffusers', 'transformers') "
            "if m in sys.modules]\nassert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_txt2img_help_imports_nothing_heavy():
    """--help must answer at once (< 2 s): it may import the command-line layer, not torch,
    numpy or the model code."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['txt2img.py', '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(ROOT / 'scripts' / 'txt2img.py')!r}, run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'omegaconf', 'ldm.pipeline') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--plms" in out.stdout and "--negative-prompt" in out.stdout


def test_the_outputs_folder_is_in_the_repository_and_its_contents_are_not():
    r = subprocess.run(["git", "check-ignore", "-q", "outputs/txt2img-samples/x.png"], cwd=ROOT)
    kept = subprocess.run(["git", "check-ignore", "-q", "outputs/.gitignore"], cwd=ROOT)
    assert (ROOT / "outputs" / ".gitignore").is_file()
    if (ROOT / ".git").exists():
        assert r.returncode == 0 and kept.returncode == 1
