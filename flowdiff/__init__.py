"""flowdiff: diffusion sampling, encoding and solver comparison on the probability-flow ODE.

    dx̄/dσ = ε_θ( x̄/√(σ²+1), t(σ) ),   x̄ = x·√(1+σ²),   σ = √((1−ᾱ)/ᾱ)

DDIM is explicit Euler on this ODE; flowdiff solves it with any method of :mod:`solvers`,
in both directions.
"""

from .api.sampling import decode, encode, generate
from .api.stochastic import noise_levels
from .engine.fingerprint import flow_fingerprint
from .engine.flow import PREDICTION_TYPES, ProbabilityFlow
from .engine.grids import GRIDS, grid_timesteps, make_sigmas
from .engine.latent import Latent
from .engine.options import Adaptive, Checks, Grid, Inversion, Save, Stochastic
from .engine.results import Result, StepState
from .engine.scheduler_grids import scheduler_sigmas
from .engine.schedules import FlowMatchingSchedule, Schedule, VESchedule
from .models.diffusers_io import from_diffusers
from .models.guidance import classifier_free_guidance
from .models.kdiffusion import from_denoiser, to_denoiser
from .models.pipelines import DiffusersFlow, SchedulerPlan, encode_like, sample_like, scheduler_plan
from .models.pretrained import digits_data, pretrained
from .tools import metrics
from .tools.compare import Comparison, Reference, compare, reference_solution
from .tools.learned import LearnedSolver, learn_solver, tune_roundtrip
from .tools.likelihood import Likelihood, Trace, log_likelihood
from .tools.metrics import Reconstruction, reconstruction
from .tools.quality import sample_quality
from .tools.roundtrip_fit import LearnedEncoder, learn_encoder
from .tools.tuning import TunedGrid, load_grids, save_grids, stored_grid, tune, tune_grid

__all__ = [
    "Adaptive",
    "Checks",
    "DiffusersFlow",
    "FlowMatchingSchedule",
    "Grid",
    "Inversion",
    "Save",
    "Stochastic",
    "VESchedule",
    "GRIDS",
    "Comparison",
    "PREDICTION_TYPES",
    "Reference",
    "Latent",
    "LearnedEncoder",
    "LearnedSolver",
    "Likelihood",
    "Trace",
    "Reconstruction",
    "ProbabilityFlow",
    "Result",
    "Schedule",
    "StepState",
    "classifier_free_guidance",
    "compare",
    "decode",
    "digits_data",
    "encode",
    "flow_fingerprint",
    "from_denoiser",
    "from_diffusers",
    "generate",
    "grid_timesteps",
    "learn_encoder",
    "learn_solver",
    "log_likelihood",
    "make_sigmas",
    "noise_levels",
    "pretrained",
    "metrics",
    "reconstruction",
    "reference_solution",
    "sample_like",
    "encode_like",
    "scheduler_plan",
    "SchedulerPlan",
    "sample_quality",
    "scheduler_sigmas",
    "to_denoiser",
    "TunedGrid",
    "tune",
    "tune_grid",
    "tune_roundtrip",
    "load_grids",
    "save_grids",
    "stored_grid",
]
