"""flowdiff: diffusion sampling, encoding and solver comparison on the probability-flow ODE.

    dx̄/dσ = ε_θ( x̄/√(σ²+1), t(σ) ),   x̄ = x·√(1+σ²),   σ = √((1−ᾱ)/ᾱ)

DDIM is explicit Euler on this ODE; flowdiff solves it with any method of :mod:`solvers`,
in both directions.
"""

from .compare import Comparison, Reference, compare, reference_solution
from .flow import PREDICTION_TYPES, ProbabilityFlow
from .grids import GRIDS, grid_timesteps, make_sigmas
from .latent import Latent
from .sampling import Result, StepState, decode, encode, generate
from .schedules import Schedule
from .stochastic import noise_levels

__all__ = [
    "GRIDS",
    "Comparison",
    "PREDICTION_TYPES",
    "Reference",
    "Latent",
    "ProbabilityFlow",
    "Result",
    "Schedule",
    "StepState",
    "compare",
    "decode",
    "encode",
    "generate",
    "grid_timesteps",
    "make_sigmas",
    "noise_levels",
    "reference_solution",
]
