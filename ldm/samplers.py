"""The samplers and schedules by name: one torch-free registry, read by the configs'
checks, the command line's ``--help``, the request's validation and the PNG metadata.

``SAMPLERS`` names every sampler (our id, A1111's label, whether it draws fresh noise, and
whether it runs on the model's own timesteps or on noise levels sigma); the step functions
themselves are in ``ldm.models.diffusion.sampling`` and ``solvers``, keyed by the same ids.
``resolve_sampler`` reads what people type (our ids, k-diffusion's, A1111's "DPM++ 2M
Karras"); ``DEFAULT_SAMPLER`` is CompVis' scripts' (DDIM).
"""
import math
from dataclasses import dataclass

# the sigma samplers' noise schedules (``ldm.models.diffusion.sampling.sigma_schedule``)
SCHEDULES = ("discrete", "karras", "exponential", "sgm_uniform")
SCHEDULE_LABELS = {"discrete": None, "karras": "Karras", "exponential": "Exponential",
                   "sgm_uniform": "SGM Uniform"}
# which of the training timesteps a schedule of n steps visits
# (``ldm.modules.diffusionmodules.util.TIMESTEP_SPACINGS``)
TIMESTEP_SPACINGS = ("uniform", "trailing", "lcm")
DEFAULT_SAMPLER = "ddim"


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler: our id, A1111's name, whether it draws fresh noise (``eta`` then scales
    that noise; 1 is the method as published), and whether it runs on the model's discrete
    timesteps over a noise prediction (DDIM, PLMS, DDPM) or on noise levels sigma over a
    denoiser (the k-diffusion family). ``spacing``: the timesteps it always visits (the
    consistency samplers' own schedule) whatever the model's default; ``eta``: (its default
    eta, the largest it takes), None for the usual (DDIM 0, others 1, no bound)."""
    id: str
    label: str
    stochastic: bool = False
    timesteps: bool = False
    spacing: str = None
    eta: tuple = None

    @property
    def default_eta(self):
        if self.eta is not None:
            return self.eta[0]
        return 0.0 if self.id == "ddim" else 1.0 if self.stochastic else 0.0


SAMPLERS = {s.id: s for s in [
    SamplerInfo("ddim", "DDIM", stochastic=True, timesteps=True),
    SamplerInfo("plms", "PLMS", timesteps=True),
    SamplerInfo("ddpm", "DDPM", stochastic=True, timesteps=True),
    SamplerInfo("euler", "Euler"),
    SamplerInfo("euler_a", "Euler a", stochastic=True),
    SamplerInfo("heun", "Heun"),
    SamplerInfo("dpm_2", "DPM2"),
    SamplerInfo("dpm_2_a", "DPM2 a", stochastic=True),
    SamplerInfo("dpmpp_2s_a", "DPM++ 2S a", stochastic=True),
    SamplerInfo("dpmpp_2m", "DPM++ 2M"),
    SamplerInfo("dpmpp_sde", "DPM++ SDE", stochastic=True),
    SamplerInfo("dpmpp_2m_sde", "DPM++ 2M SDE", stochastic=True),
    SamplerInfo("lms", "LMS"),
    SamplerInfo("unipc", "UniPC"),
    # consistency models' samplers: LCM re-injects fresh noise at every step but the last
    # (always all of it: eta 1 only); TCD's eta is its gamma, the share of the step it
    # re-noises (0: deterministic; 0.3 by default, as diffusers and the authors)
    SamplerInfo("lcm", "LCM", stochastic=True, timesteps=True, spacing="lcm", eta=(1.0, 1.0)),
    SamplerInfo("tcd", "TCD", stochastic=True, timesteps=True, spacing="lcm", eta=(0.3, 1.0)),
]}
# other spellings people use: k-diffusion's function names, older A1111 ids
_ALIASES = {"euler_ancestral": "euler_a", "dpm2": "dpm_2", "dpm_2_ancestral": "dpm_2_a",
            "dpm2_a": "dpm_2_a", "dpm2_ancestral": "dpm_2_a",
            "dpmpp_2s_ancestral": "dpmpp_2s_a", "uni_pc": "unipc", "unipc_bh2": "unipc"}


def _key(text):
    return " ".join(str(text).lower().replace("_", " ").replace("-", " ").split())


def resolve_sampler(name, schedule=None):
    """(sampler id, schedule) from what a user typed: our ids (``dpmpp_2m``), k-diffusion's
    (``sample_dpmpp_2m``, ``k_euler_a``) or A1111's names with an optional schedule suffix
    ("DPM++ 2M Karras", "Euler a"). ``schedule`` (None: the suffix's, else "discrete") must
    agree with a suffix. Raises ValueError naming the choices."""
    key = _key(name)
    suffix = None
    for sched, label in SCHEDULE_LABELS.items():
        if label and key.endswith(" " + label.lower()):
            key, suffix = key[: -len(label) - 1], sched
    ids = {_key(s.id): s.id for s in SAMPLERS.values()}
    ids.update({_key(a): target for a, target in _ALIASES.items()})
    labels = {_key(s.label): s.id for s in SAMPLERS.values()}
    for prefix in ("sample ", "k "):
        if key.startswith(prefix) and key[len(prefix):] in ids:
            key = key[len(prefix):]
    found = labels.get(key) or ids.get(key)
    if found is None:
        raise ValueError(f"unknown sampler {name!r}; choose from "
                         + ", ".join(f"{s.id} ({s.label!r})" for s in SAMPLERS.values()))
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    if suffix and schedule and schedule != suffix:
        raise ValueError(f"sampler {name!r} says schedule {suffix!r}, but schedule "
                         f"{schedule!r} was asked for")
    schedule = suffix or schedule or "discrete"
    if SAMPLERS[found].timesteps and schedule != "discrete":
        raise ValueError(f"{SAMPLERS[found].label} runs on the model's own timesteps; the "
                         f"{schedule} schedule needs a sigma sampler (e.g. dpmpp_2m, euler)")
    return found, schedule


def sampler_label(sampler, schedule="discrete"):
    """A1111's name for a sampler and schedule ("DPM++ 2M Karras")."""
    label = SAMPLERS[sampler].label
    return label if schedule == "discrete" else f"{label} {SCHEDULE_LABELS[schedule]}"


def resolve_eta(sampler, eta=None):
    """The noise multiplier a run uses: ``eta``, or the sampler's default (DDIM 0,
    ancestral and SDE samplers 1); a deterministic sampler takes none."""
    info = SAMPLERS[sampler]
    if eta is None:
        return info.default_eta
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if not info.stochastic and eta != 0:
        raise ValueError(f"{info.label} is deterministic: eta must be 0")
    if info.eta is not None and eta > info.eta[1]:
        raise ValueError(f"{info.label}'s eta must be at most {info.eta[1]:g}, got {eta:g}")
    if info.id == "lcm" and eta != 1:
        raise ValueError("LCM always re-injects all of its noise: eta must be 1 (TCD's "
                         "eta chooses how much)")
    return eta


def flow_samplers():
    """The samplers a rectified-flow model (SD 3) runs: the sigma samplers. Its ODE
    dx/ds = (x - x0) / s has the variance-exploding one's form, so the deterministic ones
    solve it unchanged; the ancestral and SDE ones add their noise through the model's
    schedule, in rectified flow's form (``noise_model.FlowSchedule.ancestral``). DDIM,
    PLMS, DDPM, LCM and TCD step a DDPM model's timesteps: not for it."""
    return [s.id for s in SAMPLERS.values() if not s.timesteps]


def check_flow_sampler(sampler):
    """ValueError naming the choices when ``sampler`` cannot drive a rectified-flow model."""
    if sampler not in flow_samplers():
        raise ValueError(f"{SAMPLERS[sampler].label} runs on a DDPM model's timesteps; a "
                         "rectified-flow model (SD 3) takes " + ", ".join(flow_samplers()))


def sampler_spacing(sampler, spacing="uniform"):
    """The timestep spacing ``sampler`` runs on: its own (LCM, TCD), else ``spacing``
    (the model's)."""
    return SAMPLERS[sampler].spacing or spacing
