"""One gradient through the sampler: memory and time against the number of steps, by adjoint= mode, beside torchdiffeq.

For each model and step count S this takes d/d(noise) of L = Σ w·generate(noise) (w fixed random
weights; the networks' parameters frozen, as in noise optimisation) by

* flowdiff ``adjoint="autograd"`` and ``"checkpoint"`` with Euler (DDIM), ``"autograd"`` and
  ``"reversible"`` with reversible Heun (its own forward solve);
* torchdiffeq's ``odeint_adjoint`` (Chen et al. 2018) on the same ODE dx̄/dσ = ε(x̄, σ), Euler on the
  same σ grid (so its forward is flowdiff's Euler solve), backward by its continuous adjoint ODE.

Memory is what autograd keeps from the forward pass to the backward pass: the bytes of every tensor
saved for backward (``torch.autograd.graph.saved_tensors_hooks``), counted during the forward.
(On a CPU there is no allocator peak to read; in checkpoint/reversible modes the backward pass adds
one step's activations at a time on top of it, two evaluations' for reversible Heun.) Time: the
forward and the backward pass of the gradient, each over the same solver's plain forward solve
without gradients; one run each on a shared machine (noisy). Gradient error: relative max-norm
difference from the discrete gradient (autograd through the same solver).

Models: the shipped digits model (1×8×8, batch 1) at S = 10, 50, 200, 1000, and a random
diffusers UNet2DModel with attention on 4×32×32 latents (SD's latent channels, ~1.1 M parameters;
"SD-sized-ish" in shape, not in width, so that it runs on a CPU) at S = 10 and 25 only (more
would take minutes on this CPU). Also writes the objective of a short noise-recovery optimisation
(examples/noise_optimisation.py's, 2 digits, 10 steps) for the figure.

With ``--saved``, instead: a loss on the states ``save=flowdiff.Save(steps=True)`` keeps besides the end,
L = Σ w·x_end + Σ_i w·x_i (every step's saved x), by ``"autograd"`` beside ``"checkpoint"`` (Euler) and
``"reversible"`` (reversible Heun), each also without ``save=`` and a loss on the end alone (what those modes held
before saved states carried gradients): bytes saved for backward, the bytes of the saved states themselves (held
by ``Result.saved``, the same with any adjoint), time, NFE and the gradient's error against autograd's, on the
digits model at S = 10, 50, 200 (writes benchmarks/results/adjoint_saved.md by default).

Usage: python benchmarks/bench_adjoint.py [--out benchmarks/results/adjoint.md] [--saved]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import flowdiff
import solvers
from flowdiff.engine.options import build_grid

MODES = (("autograd", "euler"), ("checkpoint", "euler"), ("autograd", "reversible_heun"),
         ("reversible", "reversible_heun"))


class Saved:
    """Bytes of the tensors autograd saves for backward while active."""

    def __init__(self) -> None:
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self) -> Saved:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def flowdiff_gradient(flow, noise, weights, steps, mode, solver):
    x = noise.clone().requires_grad_()
    start = time.perf_counter()
    with Saved() as saved:
        res = flowdiff.generate(flow, x, solver=solver, steps=steps, adjoint=mode)
    middle = time.perf_counter()
    (res.x * weights).sum().backward()
    seconds = (middle - start, time.perf_counter() - middle)
    return x.grad, seconds, saved.bytes, res.stats.nfe, res.stats.extra.get("nfe_backward", 0)  # autograd: none


def saved_states_gradient(flow, noise, weights, steps, mode, solver, save):
    """d/d(noise) of Σ w·x_end (+ Σ_i w·x_i over the states Save keeps, with ``save``): the gradient, seconds
    (forward, backward), bytes saved for backward, bytes of the saved states, NFE forward and backward."""
    x = noise.clone().requires_grad_()
    start = time.perf_counter()
    with Saved() as saved:
        res = flowdiff.generate(flow, x, solver=solver, steps=steps, adjoint=mode,
                                save=flowdiff.Save(steps=True) if save else None)
    middle = time.perf_counter()
    loss = (res.x * weights).sum()
    for state in res.saved or ():
        loss = loss + (state.x * weights).sum()
    loss.backward()
    seconds = (middle - start, time.perf_counter() - middle)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for state in res.saved or () for t in (state.x, state.xbar)}
    return (x.grad, seconds, saved.bytes, sum(storages.values()), res.stats.nfe,
            res.stats.extra.get("nfe_backward", 0))


def saved_states_table(out: Path) -> None:
    """The ``--saved`` comparison (see the module docstring)."""
    flow = flowdiff.pretrained("digits")
    gen = torch.Generator().manual_seed(0)
    noise, weights = torch.randn((1, 1, 8, 8), generator=gen), torch.randn((1, 1, 8, 8), generator=gen)
    for mode, solver in MODES:  # warm up
        saved_states_gradient(flow, noise, weights, 2, mode, solver, True)
    begin = time.perf_counter()
    lines = ["| steps | method | loss on | saved for backward | saved states held | forward s | backward s | "
             "NFE fwd | NFE bwd | gradient error vs autograd |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for steps in (10, 50, 200):
        for mode, solver in MODES:
            reference = {}
            for save in (True, False):
                if mode != "autograd":
                    reference.setdefault(save, saved_states_gradient(flow, noise, weights, steps, "autograd",
                                                                     solver, save)[0])
                grad, (f_s, b_s), kept, held, nfe, nfe_b = saved_states_gradient(flow, noise, weights, steps, mode,
                                                                                 solver, save)
                err = relative(grad, reference[save]) if mode != "autograd" else 0.0
                what = "end + every saved state" if save else "end only (no Save)"
                lines.append(f"| {steps} | {mode} ({solver}) | {what} | {kept / 2**20:.3f} MiB | {held / 2**10:.1f} KiB"
                             f" | {f_s:.3f} | {b_s:.3f} | {nfe} | {nfe_b} | {err:.1e} |")
    total = time.perf_counter() - begin
    lines = [f"One gradient d/d(noise) with a loss on Save(steps=True)'s states, digits model (1×8×8), torch "
             f"{torch.__version__}, {platform.machine()}, 1 thread, float32, one run each; total {total:.0f} s", "",
             *lines]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def forward_time(flow, noise, steps, solver):
    start = time.perf_counter()
    with torch.no_grad():
        flowdiff.generate(flow, noise, solver=solver, steps=steps)
    return time.perf_counter() - start


def torchdiffeq_gradient(flow, noise, weights, steps):
    from torchdiffeq import odeint_adjoint

    sig = build_grid("trailing", steps=steps, nfe=None).generation_sigmas(flow, solvers.get("euler"))  # generate's
    field = flow.field()
    count = [0]

    def f(t, y):
        count[0] += 1
        return field(float(t.detach()), y)

    ts = torch.tensor(sig, dtype=torch.float64)
    x = noise.clone().requires_grad_()
    start = time.perf_counter()
    with Saved() as saved:
        y0 = x * float((1 + ts[0] ** 2) ** 0.5)
        path = odeint_adjoint(f, y0, ts.to(noise.dtype), method="euler", adjoint_params=())
    forward_nfe = count[0]
    middle = time.perf_counter()
    (path[-1] * weights).sum().backward()
    seconds = (middle - start, time.perf_counter() - middle)
    return x.grad, seconds, saved.bytes, forward_nfe, count[0] - forward_nfe


def random_unet():
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(32, 64, 64),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    unet.eval().requires_grad_(False)
    return flowdiff.ProbabilityFlow(flowdiff.models.diffusers_io.DiffusersUNet(unet),
                                    flowdiff.Schedule.scaled_linear())  # SD's schedule


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def objective_curves(iterations: int = 20):
    flow = flowdiff.pretrained("digits")
    images = flowdiff.digits_data("test").images[:2]
    curves = {}
    for mode, solver in (("checkpoint", "euler"), ("reversible", "reversible_heun")):
        noise = flowdiff.encode(flow, images, solver="euler", steps=10).x.detach().clone().requires_grad_()
        opt = torch.optim.Adam([noise], lr=0.02)
        values = []
        for _ in range(iterations):
            loss = (flowdiff.generate(flow, noise, solver=solver, steps=10, adjoint=mode).x - images).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            values.append(float(loss.detach()))
        curves[f"{mode} ({solver})"] = values
    return curves


def plot(series, curves, path: Path) -> None:
    """Memory and time against steps by method and model, and the noise-recovery objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), dpi=110)
    methods = sorted({method for _, method in series})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for (name, method), v in series.items():
        style = "-" if name.startswith("digits") else "--"
        steps = [s for s, _, _ in v]
        label = method if name.startswith("digits") else None
        axes[0].loglog(steps, [b / 2**20 for _, b, _ in v], style, marker="o", color=colours[method], label=label)
        axes[1].semilogx(steps, [r for _, _, r in v], style, marker="o", color=colours[method])
    axes[0].set(xlabel="steps", ylabel="MiB saved for backward",
                title="memory of one gradient (—: digits, --: UNet)")
    axes[1].set(xlabel="steps", ylabel="gradient time ÷ plain forward time", title="time of one gradient")
    for k, v in curves.items():
        axes[2].semilogy(range(1, len(v) + 1), v, marker=".", label=k)
    axes[2].set(xlabel="Adam iteration", ylabel="MSE to the digits", title="noise recovery objective")
    axes[2].legend(fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--saved", action="store_true", help="the loss-on-saved-states comparison only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.saved:
        saved_states_table(args.out or Path("benchmarks/results/adjoint_saved.md"))
        return
    args.out = args.out or Path("benchmarks/results/adjoint.md")
    models = {"digits (1×8×8)": (flowdiff.pretrained("digits"), (1, 1, 8, 8), (10, 50, 200, 1000)),
              "random UNet (4×32×32)": (random_unet(), (1, 4, 32, 32), (10, 25))}
    rows, series = [], {}
    begin = time.perf_counter()
    for name, (flow, shape, step_list) in models.items():
        gen = torch.Generator().manual_seed(0)
        noise, weights = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        for mode, solver in MODES:  # warm up (the first backward pass of a process pays one-off set-up costs)
            flowdiff_gradient(flow, noise, weights, 2, mode, solver)
        for steps in step_list:
            fwd = {s: forward_time(flow, noise, steps, s) for s in ("euler", "reversible_heun")}
            discrete = {}  # autograd's gradient of each solver's discrete solve: the reference
            for mode, solver in MODES:
                grad, sec, saved, nfe, nfe_b = flowdiff_gradient(flow, noise, weights, steps, mode, solver)
                discrete.setdefault(solver, grad)
                err = relative(grad, discrete[solver])
                rows.append((name, steps, f"flowdiff {mode} ({solver})", saved, sec, fwd[solver], nfe, nfe_b, err))
                series.setdefault((name, f"flowdiff {mode} ({solver})"), []).append(
                    (steps, saved, sum(sec) / fwd[solver]))
            grad, sec, saved, nfe, nfe_b = torchdiffeq_gradient(flow, noise, weights, steps)
            rows.append((name, steps, "torchdiffeq odeint_adjoint (euler)", saved, sec, fwd["euler"], nfe, nfe_b,
                         relative(grad, discrete["euler"])))
            series.setdefault((name, "torchdiffeq odeint_adjoint"), []).append(
                (steps, saved, sum(sec) / fwd["euler"]))
            print(f"{name} S={steps} done at {time.perf_counter() - begin:.0f} s", flush=True)
    curves = objective_curves()
    total = time.perf_counter() - begin

    lines = [f"One gradient d/d(noise) through the sampler (torch {torch.__version__}, {platform.machine()}, "
             f"1 thread, float32, one run each; total {total:.0f} s)", "",
             "| model | steps | method | saved for backward | plain forward s | forward s | backward s | "
             "backward ÷ plain forward | gradient ÷ plain forward | NFE fwd | NFE bwd | gradient error vs discrete |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, steps, method, saved, (f_s, b_s), plain, nfe, nfe_b, err in rows:
        lines.append(f"| {name} | {steps} | {method} | {saved / 2**20:.3f} MiB | {plain:.3f} | {f_s:.3f} | {b_s:.3f} | "
                     f"{b_s / plain:.2f} | {(f_s + b_s) / plain:.2f} | {nfe} | {nfe_b} | {err:.1e} |")
    lines += ["", "Saved bytes, reversible mode, largest ÷ smallest over the step counts: " + ", ".join(
        f"{name}: {max(s for _, s, _ in v) / min(s for _, s, _ in v):.3f}"
        for (name, method), v in series.items() if method.startswith("flowdiff reversible")),
        "", "Noise-recovery objective (MSE, 2 digits, 10 steps, Adam lr 0.02), first → last of 20 iterations: " +
        ", ".join(f"{k}: {v[0]:.4f} → {v[-1]:.4f}" for k, v in curves.items())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))

    plot(series, curves, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
