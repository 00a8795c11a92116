"""The commands: compare, sample, encode, decode and roundtrip, each given the parsed arguments.

Every command plans its outputs first (:mod:`._outputs`: names that cannot collide, nothing overwritten without
``--overwrite``, folders writable), then loads the model and runs, then writes each file atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import warnings
from pathlib import Path

import torch
from torch import Tensor

import solvers as _solvers

from ..engine._files import atomic_path, regular_file
from ..engine.fingerprint import flow_fingerprint
from ..engine.flow import ProbabilityFlow, check_from_noise
from ..engine.latent import Latent
from ..engine.plugins import plugins, solver_plugin
from ..runs import distributed
from ..runs.imageio import ImageFormat
from ..tools.report import FILES as REPORT_FILES
from ..tools.report import ROUNDTRIP_FIGURE
from . import _learned, _prompt
from ._argtypes import available_device
from ._errors import CommandError, UsageError, one_line, say
from ._images import as_written, default_format, load_images, save_grid, write_images
from ._models import BUILTIN_MODELS, LoadedModel, in_dtype, load_model
from ._outputs import image_output_name, output_dir, plan, relative_names

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Tolerance of ``flowdiff compare``'s reference solve (see benchmarks/results/compare.md for its cost and error).
REFERENCE_RTOL = 1e-5


def _setup(args: argparse.Namespace, *, convert: bool = True, dtype: str | None = None,
           info: dict | None = None, batch: int | None = None) -> tuple[LoadedModel, torch.dtype, torch.device]:
    """The model on the device (its network in ``--dtype`` unless ``convert=False``), conditioned on
    ``--prompt`` or ``--class-label`` (or on the records in a decode's latents' ``info``) for ``batch`` samples,
    the dtype and the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.model in BUILTIN_MODELS:
        torch.set_num_threads(1)
    device = available_device(args.device)
    torch_dtype = DTYPES[dtype or args.dtype]
    loaded = load_model(args.model, dtype=torch_dtype if convert else None, device=device)
    try:
        info = info if isinstance(info, dict) else {}
        loaded = _prompt.condition(loaded, args, info.get("prompt"), label_record=info.get("class_label"),
                                   batch=batch)
    except ValueError as err:
        raise CommandError(one_line(err)) from None
    return loaded, torch_dtype, device


def _noise(args: argparse.Namespace, n: int, shape: tuple[int, int, int], dtype: torch.dtype,
           device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _budget(args: argparse.Namespace) -> dict[str, int]:
    if args.nfe is not None:
        return {"nfe": args.nfe}
    if args.steps is not None:
        return {"steps": args.steps}
    return {"nfe": args.default_nfe} if args.default_nfe is not None else {"steps": args.default_steps}


def _grid(args: argparse.Namespace, loaded: LoadedModel) -> dict:
    """The grid and budget keywords of ``generate``/``encode``: ``--grid NAME`` with the budget in force, or for
    ``--grid tuned`` the tuned grid stored for this model, ``--solver`` and ``--nfe`` (refused where none is)."""
    budget = _budget(args)
    if args.grid != "tuned":
        _check_budget(args, loaded, budget)
        return {"grid": args.grid, **budget}
    from ..engine.options import Grid
    from ..tools.tuning import STORED_DIR, load_grids, stored_grid

    if "nfe" not in budget:
        raise CommandError(f"--grid tuned needs --nfe N (got --steps {budget['steps']}): tuned grids are stored per "
                           "NFE budget")
    model_kwargs = loaded.model_kwargs or None
    # tuned grids are stored for the solvers package's methods; a generate-only plug-in (flowmatch_heun) has none
    made = (stored_grid(loaded.flow, args.solver, budget["nfe"], model_kwargs=model_kwargs)
            if args.solver in _solvers.available() else None)
    if made is None:
        mine = fingerprint(loaded)
        have = sorted({(g.solver, g.nfe) for path in sorted(STORED_DIR.glob("*.tuned.json"))
                       for g in load_grids(path) if g.fingerprint == mine and not g.solver_options})
        stored = ", ".join(f"{solver} at {nfe}" for solver, nfe in have) or "none"
        raise CommandError(f"--grid tuned: no tuned grid is stored for --model {args.model!r} with --solver "
                           f"{args.solver} at --nfe {budget['nfe']} (stored for this model: {stored}); pick one of "
                           "those, or another --grid, or tune one with flowdiff.tune and flowdiff.save_grids")
    return {"grid": Grid(sigmas=made.sigmas)}


def _check_budget(args: argparse.Namespace, loaded: LoadedModel, budget: dict[str, int]) -> None:
    """Build the command's σ grid before the work, so that a budget it cannot have is refused naming the flag the
    user typed (``--nfe 2000``), not the keyword of the Python call it became (``steps=2000``)."""
    from ..engine.options import Grid

    direction = "generate" if args.command == "sample" else "encode"
    plugin = solver_plugin(args.solver)  # a generate-only method sample --solver takes (flowmatch_heun)
    if args.solver not in _solvers.available() and (plugin is None or plugin.direction != direction):
        return
    solver = _solvers.get(args.solver) if plugin is None else plugin.make({})
    (key, value), = budget.items()
    try:
        sigmas = Grid(args.grid, **budget).solve_sigmas(loaded.flow, solver, direction)
    except ValueError as err:
        if math.isinf(loaded.flow.schedule.sigma_max) and "finite sigma_max" in str(err):
            _refuse_infinite_sigma_max(args, loaded, direction)
        said = {key: f"--{key} {value}"}  # the flag given; a step count it bought is said as a count
        text = re.sub(r"\b(steps|nfe) >= (\d[\d,]*)", r"--\1 \2 or more", one_line(err))  # what it accepts
        text = re.sub(r"\b(steps|nfe)=(\d[\d,]*)", lambda m: said.get(m[1], f"{m[2]} {m[1]}"), text)
        default = "" if args.nfe is not None or args.steps is not None else "; the default budget"
        where = f"--solver {args.solver} on --grid {args.grid}"
        if said[key] in text:
            raise CommandError(f"{text} ({where}{default})") from None
        raise CommandError(f"{said[key]}{default} with {where}: {text}") from None
    if direction == "encode" and any(math.isinf(float(s)) for s in sigmas):  # the Python advice is grid=grid[1:]
        raise UsageError(f"--grid {args.grid} with --model {args.model!r}: encoding would end at σ = ∞ (zero terminal "
                         "SNR), where the state is infinite and no decode retraces the last step; give --grid leading, "
                         "whose last σ is finite")
    if direction == "generate" and math.isinf(float(sigmas[0])):
        try:  # an epsilon model has no step out of σ = ∞; the refusal's advice (grid=grid[1:]) is Python's
            check_from_noise(loaded.flow)
        except ValueError as err:
            reason = one_line(err).split("; ")[0]
            raise UsageError(f"--grid {args.grid} with --model {args.model!r}: {reason}; give --grid leading, whose "
                             "first σ is finite") from None


def _refuse_infinite_sigma_max(args: argparse.Namespace, loaded: LoadedModel, direction: str) -> None:
    """A σ-range grid (karras, logsnr) needs a finite σ_max, and a zero-terminal-SNR schedule's is ∞: the Python
    advice (grid_options={'sigma_max': ...}) has no flag, so name the grids the command line has that run there."""
    grids = "--grid trailing or --grid leading"
    if direction == "encode":  # trailing ends at σ = ∞, where no decode retraces the step
        grids = "--grid leading, whose last σ is finite"
    else:
        try:  # an epsilon model has no step out of σ = ∞ either: trailing starts there
            check_from_noise(loaded.flow)
        except ValueError:
            grids = "--grid leading, whose first σ is finite"
    raise UsageError(f"--grid {args.grid} with --model {args.model!r}: the {args.grid} grid spans the schedule's "
                     f"σ range and this schedule's σ_max is ∞ (zero terminal SNR), so it has no first σ; give "
                     f"{grids} (the command line sets no σ_max)") from None


def fingerprint(loaded: LoadedModel) -> str:
    """The key of the reference kept on disk: :func:`flowdiff.engine.fingerprint.flow_fingerprint` of the model."""
    try:
        return flow_fingerprint(loaded.flow, loaded.model_kwargs or None)  # the prompt's embeddings too
    except TypeError as err:
        raise CommandError(f"cannot fingerprint this model for the reference cache: {err}") from None


def cmd_compare(args: argparse.Namespace) -> int:
    # under torchrun the runs are split over the processes and gathered on rank 0, which writes and prints
    ranks = distributed.process_group(args.device)
    args.device = str(distributed.rank_device(args.device, ranks))
    try:
        return _cmd_compare(args, ranks)
    finally:
        distributed.close(ranks)


#: Images of each run the report's sample grid shows.
SAMPLE_IMAGES = 4


def _unused_compare_flags(args: argparse.Namespace) -> None:
    """Refuse the flags that would change nothing in this run: the noise and reference flags beside --task roundtrip
    (it encodes held-out digits against themselves), --calibration-seed beside grids none of which is tuned. Each was
    taken without a word. (A flag given at its default value cannot be told from its absence, and changes nothing.)"""
    if args.task == "roundtrip":
        given = [flag for flag, value, default in (("--seed", args.seed, 0), ("--rtol", args.rtol, REFERENCE_RTOL),
                                                   ("--fresh-reference", args.fresh_reference, False),
                                                   ("--calibration-seed", args.calibration_seed, None))
                 if value != default]
        if given:
            one = len(given) == 1
            raise UsageError(f"{', '.join(given)} {'applies' if one else 'apply'} to --task generate (its noise, "
                             "reference and tuning); --task roundtrip encodes the held-out digits and measures "
                             f"against them: leave {'it' if one else 'them'} out")
    elif args.solver and (encode_only := [s for s in args.solver if s in plugins("solver", "encode")]):
        raise UsageError(f"--solver {','.join(encode_only)}: an encoder only; compare encoders with --task roundtrip "
                         "(a generation has no such solver)")
    elif args.calibration_seed is not None and args.grid is not None and "tuned" not in args.grid:
        raise UsageError(f"--calibration-seed {args.calibration_seed} seeds the noise --grid tuned is tuned on, and "
                         f"--grid {','.join(args.grid)} has no tuned grid: add tuned to --grid, or leave it out")


def _untuned_calibration_seed(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """Refuse ``--calibration-seed`` beside the default grids where they hold no tuned grid (a model flowdiff ships
    none for, at these solvers and budgets): it would seed noise no grid is tuned on. (A --grid list without tuned
    is refused before the model is loaded, by :func:`_unused_compare_flags`.)"""
    if args.task != "generate" or args.calibration_seed is None or args.grid is not None:
        return
    from ..tools.compare import TUNED_GRIDS, default_grids, default_solvers

    grids = default_grids(loaded.flow, args.solver or default_solvers(), args.nfe, loaded.model_kwargs or None)
    if not set(grids) & set(TUNED_GRIDS):
        raise UsageError(f"--calibration-seed {args.calibration_seed} seeds the noise --grid tuned is tuned on, and "
                         f"the default grids ({', '.join(grids)}) have no tuned grid: flowdiff ships none for this "
                         "model at these solvers and budgets; add --grid " + ",".join((*grids, "tuned")) + " to tune "
                         "one, or leave --calibration-seed out")


def _refuse_no_step_from_infinity(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """On a zero-terminal-SNR schedule (σ_max = ∞) the reference and every run of ``compare`` start with the
    boundary step out of pure noise, which an ``epsilon`` model has not: a usage error in the command line's words
    (the Python advice, reference_solution(sigma_start=σ) beside grid=grid[1:], has no flags)."""
    if not math.isinf(loaded.flow.schedule.sigma_max):
        return
    if args.peers:  # their grids have no finite first σ (flowdiff.tools.compare._refuse_peers_from_infinity)
        raise UsageError(f"--peers {','.join(args.peers)} with --model {args.model!r}: the peers' samplers are not run "
                         "on a zero-terminal-SNR schedule (σ_max = ∞), where their grids have no finite first σ; "
                         "leave --peers out to compare flowdiff's solvers, which start from σ = ∞ as sample does")
    try:
        check_from_noise(loaded.flow)
    except ValueError as err:
        reason = one_line(err).split("; ")[0].replace("where this grid starts", "where compare starts")
        raise UsageError(f"--model {args.model!r}: {reason}; flowdiff compare measures every run against a reference "
                         "from σ = ∞ and accepts a model with prediction_type 'v_prediction' or 'sample' there. This "
                         "model samples from a finite σ: flowdiff sample --grid leading") from None


def _cmd_compare(args: argparse.Namespace, ranks: distributed.Ranks) -> int:
    from ..tools.compare import Reference, reference_solution
    from ..tools.reference import default_sigma_start, last_finite_sigma

    # each rank's setup, ended by one exchange: a failure on one rank alone (one GPU out of memory while loading the
    # model) is said on every rank, 'rank R of N failed: <why>', not met as gloo's closed connection in the next one
    with ranks.together():
        _unused_compare_flags(args)
        _learned.compare_flags(args)
        if args.task == "roundtrip":
            from ..models.pretrained import digits_data

            held_out = len(digits_data("test").images)
            if args.batch > held_out:  # it was cut to them, and the report said --batch
                raise UsageError(f"--batch {args.batch}: --task roundtrip encodes the held-out digits, of which there "
                                 f"are {held_out}; give --batch {held_out} or fewer")
        # the reference is solved from the network as saved (copied to float64), the runs in --dtype
        loaded, dtype, device = _setup(args, convert=False, batch=args.batch)
        _untuned_calibration_seed(args, loaded)  # before --out is made: a refusal leaves nothing behind
        run_flow = in_dtype(loaded.flow, dtype)
        solvers = _learned.compare_solvers(args, run_flow, loaded.model_kwargs)  # each --learned file, read and checked
        out = output_dir(args.out)
        names = [*REPORT_FILES.values()] + ([ROUNDTRIP_FIGURE] if args.task == "roundtrip" else [])
        plan([(out / name, "--out") for name in names], overwrite=args.overwrite)
        # this rank's inputs on its device, in the block too: a rank whose GPU cannot hold them is said on every rank
        if args.task == "roundtrip":  # held-out digits (the shipped models' data) encoded and decoded back
            if args.peers:
                raise CommandError("--peers applies to --task generate: the peers' samplers do not encode")
            images = _held_out_digits(args, loaded, dtype, device)
        else:
            _refuse_no_step_from_infinity(args, loaded)  # before the reference: it starts at σ = ∞ too
            noise = _noise(args, args.batch, loaded.shape, dtype, device)
    ref_path = out / "reference.safetensors"
    if args.task == "roundtrip":
        return _compare_roundtrip(args, loaded, run_flow, images, device, out, ranks)
    # The reference depends on the model, the noise (seed, batch, shape) and the tolerance, not on --dtype:
    # it is always solved in float64 from the same float64 draw, so it is kept on disk under that key.
    key = f"{fingerprint(loaded)}|seed={args.seed}|batch={args.batch}|shape={loaded.shape}|dopri8|{args.rtol!r}"

    def kept_or_solved() -> tuple[Reference, bool]:
        ref, kept = None, False
        if ref_path.exists() and not (args.fresh_reference and ranks.is_main):  # the others read rank 0's
            try:
                ref = Reference.load(ref_path, key)
            except Exception as err:  # an unreadable or foreign file is another's: not replaced without being asked
                if not args.overwrite:
                    raise CommandError(f"{os.fspath(ref_path)!r} is not a flowdiff reference file ({one_line(err)}); "
                                       "pass --overwrite or --fresh-reference to replace it") from None
            if ref is not None and ref.sigma_start != default_sigma_start(loaded.flow):
                # kept from where the reference started before (σ_max on a flow-matching model, which it now solves
                # from t = 1): the key does not hold the start, and this one is not the reference of this run
                ref = None
            kept = ref is not None
        if ref is None:
            if not args.no_progress:
                say(f"solving the float64 reference (dopri8, rtol=atol={args.rtol:g}); it is kept in {ref_path} "
                    "for later runs")
            ref = reference_solution(loaded.flow, _noise(args, args.batch, loaded.shape, torch.float64, device),
                                     rtol=args.rtol, atol=args.rtol, model_kwargs=loaded.model_kwargs or None,
                                     progress=not args.no_progress)
            with atomic_path(ref_path, "reference") as tmp:
                ref.save(tmp, key)
        return ref, kept

    ref, kept = ranks.main_first(kept_or_solved)  # solved once, by rank 0, and read from its file by the others
    calibration = None if args.calibration_seed is None else torch.randn(
        noise.shape, generator=torch.Generator().manual_seed(args.calibration_seed), dtype=noise.dtype).to(device)
    # peers run once, on rank 0, after the ranks' runs (same noise, budgets and reference); rank 0 receives the
    # images the report's sample grid shows, flowdiff's rows from whichever rank ran them
    from ..tools.tuning import NO_VALIDATION

    with warnings.catch_warnings():  # said below in the flags' words, once, for the grids tuned here
        warnings.filterwarnings("ignore", message=NO_VALIDATION, category=UserWarning)
        result = distributed.compare(run_flow, noise, ranks=ranks, solvers=solvers, grids=args.grid,
                                     nfe=args.nfe, model_kwargs=loaded.model_kwargs or None, reference=ref,
                                     progress=not args.no_progress, calibration_noise=calibration,
                                     tune_options={"progress": not args.no_progress}, peers=args.peers or None,
                                     keep_images=SAMPLE_IMAGES)
    if not ranks.is_main:
        return 0
    ref = result.reference
    start = f"σ={ref.sigma_start:.4g}"
    if math.isinf(ref.sigma_start):  # zero terminal SNR: as generate starts, with the boundary step out of σ = ∞
        start = f"σ=∞ (the boundary step out of pure noise to σ={last_finite_sigma(loaded.flow.schedule):.4g}, then)"
    header = (f"model {loaded.name}, {args.batch} samples of shape {loaded.shape}, {args.dtype}, seed {args.seed}; "
              f"reference: {ref.solver} rtol=atol={ref.rtol:g} from {start} to σ={ref.sigma_end:.4g} "
              f"then the Euler step to 0, {ref.nfe} NFE, "
              f"estimated error {ref.error:.1e}" + (f" (kept in {ref_path})" if kept else ""))
    facts = _report_facts(args, loaded, device)
    facts["noise"] = f"seed {args.seed}, {args.batch} samples of shape {tuple(loaded.shape)}, {args.dtype}"
    facts["reference"] = (f"{ref.solver} in float64, rtol = atol = {ref.rtol:g}, from {start} to "
                          f"σ={ref.sigma_end:.4g} then the Euler step to 0, {ref.nfe} NFE, estimated error "
                          f"{ref.error:.1e}")
    paths = _write_report(result, out, args, loaded, facts, f"{loaded.name}: {args.batch} samples, {args.dtype}")
    print(header)
    for why in result.unavailable.values():
        print(f"peer not run: {why}")
    print()
    print(result.to_markdown(args.layout))
    for budget in result.budgets:
        if any(r.budget == budget for r in result.runs):
            best = result.best(budget)
            print(f"best at NFE {budget}: {best.method} (RMS error {best.rms_error:.2e}, NFE used {best.nfe})")
    mine = [r for r in result.runs if r.source == "flowdiff"]
    if mine:
        top = min(mine, key=lambda r: (-r.budget, r.rms_error))
        print(f"reproduce the best flowdiff row at NFE {top.budget}: {_reproduce(args, top, result.provided)}")
    for skip in result.skipped:
        peer = "" if skip.source == "flowdiff" else f"{skip.source}: "
        print(f"skipped {peer}{skip.solver} on {skip.grid} at NFE {skip.budget}: {skip.reason}")
    shipped = {}
    for (solver, grid, budget), made in result.provided.items():
        source = getattr(made, "source", "")
        if source:
            shipped.setdefault(source, []).append(made)
        else:
            unchecked = "" if made.options.get("validate", True) else ", no held-out validation"
            print(f"{grid} grid of {solver} at NFE {budget}: tuning cost {made.tuning_nfe} NFE, "
                  f"{made.tuning_seconds:.1f} s{unchecked}")
    if any(not getattr(made, "options", {}).get("validate", True) for made in result.provided.values()
           if not getattr(made, "source", "")):
        say(f"flowdiff compare: warning: --batch {args.batch}: the grids tuned here were fitted to their one "
            "calibration sample without the held-out validation, which needs --batch 2 or more")
    for source, made in shipped.items():
        batches = "/".join(str(b) for b in sorted({m.options.get("calibration_batch", 0) for m in made}))
        print(f"tuned grids: {len(made)} shipped ones from {source}, tuned once on other noise ({batches} "
              "samples, flowdiff.tools.compare.CALIBRATION_SEED); --calibration-seed N tunes them here instead")
    if args.grid is None and not any(g == "tuned" for _, g, _ in result.provided):
        print("no shipped tuned grids cover this model and these solvers and budgets: add --grid "
              "trailing,karras,logsnr,tuned to tune them here on calibration noise (it costs model evaluations)")
    print(f"wrote the report {paths['report']} with {', '.join(p.name for k, p in paths.items() if k != 'report')}")
    return 0


def _report_facts(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> dict[str, str]:
    from ..tools.report import versions

    facts = {"model": f"{loaded.name} (fingerprint {fingerprint(loaded)})",
             "device": f"{device}, {args.dtype}"}
    facts["versions"] = ", ".join(f"{k} {v}" for k, v in versions(args.peers or ()).items())
    return facts


def _reproduce(args: argparse.Namespace, run, provided: dict) -> str:  # noqa: ANN001 - a flowdiff.tools.compare.Run
    """The ``flowdiff sample`` command that makes ``run``'s images (the same seeded noise, solver, grid, budget)."""
    model = "" if args.model == "digits" else f" --model {shlex.quote(args.model)}"
    solve = _learned.reproduce(args, run) or f"--solver {run.solver} --grid {run.grid} --nfe {run.budget}"
    note = ""
    if run.grid == "tuned":
        stored = getattr(provided.get((run.solver, run.grid, run.budget)), "source", "")
        note = ("  # the stored tuned grid" if stored else
                "  # NB: this grid was tuned here (--calibration-seed); --grid tuned uses the stored one, if any")
    conditioning = "".join(f" --{name.replace('_', '-')} {shlex.quote(str(value))}"
                           for name in ("prompt", "negative_prompt", "guidance", "embedded_guidance")
                           if (value := getattr(args, name, None)) is not None)
    return (f"flowdiff sample{model} {solve} --seed {args.seed} "
            f"--num {args.batch} --dtype {args.dtype}{conditioning}{note}")


def _write_report(result, out: Path, args: argparse.Namespace, loaded: LoadedModel,  # noqa: ANN001
                  facts: dict[str, str], title: str, figures: dict | None = None, reproduce: bool = True
                  ) -> dict[str, Path]:
    """The report; ``reproduce``: with the `flowdiff sample` command of the best row (a generation's, not a round
    trip's: no command reproduces a round trip of the held-out digits)."""
    from ..tools.report import write_report

    def to_images(x: Tensor) -> Tensor:  # the flow's data (latents of a latent pipeline) → images in [0, 1]
        with torch.no_grad():
            images = _prompt.to_images(loaded, x.to(device=result.reference.x.device, dtype=DTYPES[args.dtype]))
        return ((images.detach().cpu().float().clamp(-1, 1) + 1) / 2)

    return write_report(result, out, facts=facts,
                        reproduce=(lambda run: _reproduce(args, run, result.provided)) if reproduce else None,
                        title=title, to_images=to_images, figures=figures)


def _held_out_digits(args: argparse.Namespace, loaded: LoadedModel, dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """The first ``--batch`` held-out digits on ``device``, that ``--task roundtrip`` encodes and decodes back."""
    from ..models.pretrained import digits_data

    if tuple(loaded.shape) != (1, 8, 8):
        raise CommandError(f"--task roundtrip runs on the held-out 8×8 digits; --model {args.model!r} makes images of "
                           f"shape {tuple(loaded.shape)} (use flowdiff.compare(task='roundtrip', images=...) from "
                           "Python)")
    return digits_data("test").images[: args.batch].to(device, dtype).reshape(-1, *loaded.shape)


def _compare_roundtrip(args: argparse.Namespace, loaded: LoadedModel, run_flow: ProbabilityFlow, images: Tensor,
                       device: torch.device, out: Path, ranks: distributed.Ranks) -> int:
    from ..api.sampling import decode, encode
    from ..engine.options import Grid
    from ..tools.report import ranked_methods, roundtrip_figure

    result = distributed.compare(run_flow, ranks=ranks, task="roundtrip", images=images, solvers=args.solver,
                                 grids=args.grid, nfe=args.nfe, model_kwargs=loaded.model_kwargs or None)
    if not ranks.is_main:
        return 0
    if not result.runs:  # nothing encoded: say why rather than fail on an empty figure
        raise CommandError("no run could encode: " + "; ".join(
            f"{s.solver} on {s.grid} at NFE {s.budget}: {s.reason}" for s in result.skipped[:5]))
    top = max(result.budgets)
    shown = images[:SAMPLE_IMAGES]
    recon = {}
    for _, solver, grid in ranked_methods(result)[:3]:  # the best encoders, again on the images shown
        with torch.no_grad():
            enc = encode(run_flow, shown, solver=solver, grid=Grid(grid, nfe=top))
            recon[f"{solver} / {grid}, NFE {top}"] = decode(run_flow, enc.latent).x
    with atomic_path(out / ROUNDTRIP_FIGURE) as tmp:
        roundtrip_figure(shown, recon, tmp)
    figure = out / ROUNDTRIP_FIGURE
    facts = _report_facts(args, loaded, device)
    facts["images"] = f"the first {args.batch} held-out digits, {args.dtype}; error against them (no reference solve)"
    paths = _write_report(result, out, args, loaded, facts, "round trip: decode(encode(x))",
                          figures={"Inputs, reconstructions and error maps": figure}, reproduce=False)
    print(result.to_markdown(args.layout))
    for skip in result.skipped:  # as the generate task says them: a "—" in the table alone says nothing
        print(f"skipped {skip.solver} on {skip.grid} at NFE {skip.budget}: {skip.reason}")
    print(f"wrote the report {paths['report']} with {', '.join(p.name for k, p in paths.items() if k != 'report')}, "
          f"{figure.name}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ..api.sampling import generate

    _learned.sample_flags(args)  # --learned fixes the solver, grid and budget: refused beside it, before any work
    (path,) = plan([(Path(args.out), "--out")], overwrite=args.overwrite)
    _check_image_suffix(path, "--out")
    loaded, dtype, device = _setup(args, batch=args.num)
    scale = _grid_scale(args, _prompt.image_shape(loaded))  # checked before the work
    solve, how = _learned.sample_solve(args, loaded.flow, loaded.model_kwargs)
    if args.learned is None:
        solve.update(_grid(args, loaded))
    noise = _noise(args, args.num, loaded.shape, dtype, device)
    result = generate(loaded.flow, noise, model_kwargs=loaded.model_kwargs or None, **solve)
    path = save_grid(_prompt.to_images(loaded, result.x), path, scale=scale)
    print(f"{args.num} samples with {result.solver} {how}: {result.stats.nfe} NFE, "
          f"{len(result.sigmas) - 1} steps, {result.stats.wall_time:.2f} s; wrote {path}")
    return 0


def _grid_scale(args: argparse.Namespace, image_shape: tuple[int, ...]) -> int:
    """The magnification of `sample`'s grid: ``--scale``, else up to 64 pixels a side; either way within the pixels
    an image flowdiff reads may have (:func:`flowdiff.runs.imageio.pixel_limit`), or refused before the work."""
    from ..runs.imageio import pixel_limit

    h, w = image_shape[-2:]
    cols = math.ceil(math.sqrt(args.num))
    rows = math.ceil(args.num / cols)
    pixels = (rows * (h + 1) + 1) * (cols * (w + 1) + 1)  # the grid at scale 1 (see save_grid)
    limit = pixel_limit()
    if args.scale is None:
        scale = max(1, 64 // max(h, w))
        while scale > 1 and pixels * scale * scale > limit:
            scale -= 1
        return scale
    if pixels * args.scale**2 > limit:
        raise UsageError(f"--num {args.num} --scale {args.scale}: the grid would have {pixels * args.scale**2:,} "
                         f"pixels, more than an image flowdiff reads may have ({limit:,}, FLOWDIFF_MAX_PIXELS); give "
                         "a smaller --scale or fewer --num")
    return args.scale


def _check_image_suffix(path: Path, option: str) -> None:
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"{option} {os.fspath(path)!r}: not an image file name; give one ending in .png (or "
                           ".tif, .bmp)")


def _check_latents_suffix(path: Path, option: str) -> None:
    """A latents file is safetensors: a name with an image suffix would hold no image (``--out x.png``)."""
    from PIL import Image

    if path.suffix.lower() in Image.registered_extensions():
        raise UsageError(f"{option} {os.fspath(path)!r}: an image file name, but {option} takes the latents (a "
                         "safetensors file, not an image); give a name ending in .safetensors (the images of a "
                         "latents file are written by 'flowdiff decode')")


def _encode(args: argparse.Namespace, loaded: LoadedModel, dtype: torch.dtype, device: torch.device) -> tuple:
    from ..api.sampling import encode
    from ..engine.options import Inversion

    images, formats = load_images(args.images, _prompt.image_shape(loaded))
    images = images.to(device=device, dtype=dtype)
    data = _prompt.to_latents(loaded, images)  # a latent pipeline's flow runs on its autoencoder's latents
    if not args.fixed_point:
        result = encode(loaded.flow, data, solver=args.solver, model_kwargs=loaded.model_kwargs or None,
                        **_grid(args, loaded))
    else:
        with warnings.catch_warnings():  # the images that missed the tolerance are reported below, by name
            warnings.filterwarnings("ignore", message="fixed-point inversion", category=RuntimeWarning)
            result = encode(loaded.flow, data,
                            solver=Inversion("fixed_point", {"on_failure": "keep"}, solver=args.solver),
                            model_kwargs=loaded.model_kwargs or None, **_grid(args, loaded))
        missed = result.stats.extra["unconverged"]
        if missed:
            print(f"fixed-point inversion: {len(missed)} of {len(args.images)} image(s) have no exact preimage under "
                  f"this decode (best iterate kept): {', '.join(args.images[i] for i in missed)}")
    # the latent keeps, for `flowdiff decode`, the model's name and each image's name and format
    names = relative_names(args.images)
    result.latent.info = {"model": loaded.name, "images": [
        {"name": n.as_posix(), "mode": f.mode, "bits": f.bits, "kind": f.kind} for n, f in zip(names, formats)]}
    _prompt.write_record(loaded, result.latent)
    return images, formats, result


def cmd_encode(args: argparse.Namespace) -> int:
    decoded: dict[Path, str] = {}  # `flowdiff decode` writes each image under this name: refuse what it would refuse
    for name, image in zip((image_output_name(n) for n in relative_names(args.images)), args.images):
        if name in decoded:
            raise UsageError(f"the images {decoded[name]!r} and {image!r} would both be decoded to {name.as_posix()!r} "
                             "(decode writes each image under its input's relative path, lossy types as .png); give "
                             "each image once, under distinct names")
        decoded[name] = image
    _check_latents_suffix(Path(args.out), "--out")
    (path,) = plan([(Path(args.out), "--out")], inputs=args.images, overwrite=args.overwrite)
    loaded, dtype, device = _setup(args, batch=len(args.images))
    _, _, result = _encode(args, loaded, dtype, device)
    _save_latent(result.latent, path)
    print(f"encoded {len(args.images)} image(s) with {result.solver} on the {args.grid} grid: "
          f"{result.stats.nfe} NFE, {result.latent.steps} steps; wrote {path}")
    return 0


def _save_latent(latent: Latent, path: Path) -> None:
    try:
        latent.save(path)
    except (OSError, TypeError) as err:
        raise CommandError(f"cannot write the latents {os.fspath(path)!r}: {one_line(err)}") from None


def _recorded_images(latent: Latent, stem: str, channels: int) -> tuple[list[Path], list[ImageFormat]]:
    """Output names and formats of a latent's images: as `flowdiff encode` recorded them, else ``STEM_000.png``."""
    n = latent.x.shape[0]
    records = latent.info.get("images") if isinstance(latent.info, dict) else None
    if isinstance(records, list) and len(records) == n:
        try:
            names = [image_output_name(Path(r["name"])) for r in records]
            formats = [ImageFormat(str(r["mode"]), int(r["bits"]), str(r.get("kind", "uint"))) for r in records]
        except (KeyError, TypeError, ValueError):
            names = []
        if names and all(not p.is_absolute() and ".." not in p.parts for p in names) \
                and all(f.channels == channels for f in formats):
            return names, formats
    return [Path(f"{stem}_{i:03d}.png") for i in range(n)], [default_format(channels)] * n


def cmd_decode(args: argparse.Namespace) -> int:
    from ..api.sampling import decode
    from ..engine.options import Checks

    path = Path(args.latents)
    try:  # a FIFO or a folder is named as what it is (and a FIFO is not read: that would wait for a writer)
        regular_file(path, "latents")
    except (OSError, ValueError) as err:
        raise CommandError(one_line(err)) from None
    out = output_dir(args.out)
    try:
        latent = Latent.load(path)
    except (ValueError, OSError) as err:
        raise CommandError(one_line(err)) from None
    records = latent.info.get("images") if isinstance(latent.info, dict) else None
    channels = latent.x.shape[1] if latent.x.ndim == 4 else 0
    if isinstance(records, list) and records and isinstance(records[0], dict) and "mode" in records[0]:
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}.get(str(records[0]["mode"]), channels)  # the images'
    if channels not in (1, 2, 3, 4):
        raise CommandError(f"latents {args.latents!r} hold a tensor of shape {tuple(latent.x.shape)}, not a batch of "
                           "images (N, C, H, W)")
    names, formats = _recorded_images(latent, path.stem, channels)
    targets = plan([(out / n, f"the image {n.as_posix()!r} of {args.latents!r}") for n in names],
                   inputs=[path], overwrite=args.overwrite)
    own = str(latent.dtype).removeprefix("torch.")
    if args.dtype is not None and args.dtype != own and latent.exact:
        raise CommandError(f"latents {args.latents!r} decode exactly in {own}; --dtype {args.dtype} would lose that "
                           "exactness: omit --dtype")
    loaded, dtype, device = _setup(args, dtype=args.dtype or own, info=latent.info, batch=latent.x.shape[0])
    if tuple(latent.x.shape[1:]) != tuple(loaded.shape):
        made_by = latent.info.get("model") if isinstance(latent.info, dict) else None
        raise CommandError(f"latents {args.latents!r} have images of shape {tuple(latent.x.shape[1:])}; the model "
                           f"{loaded.name!r} makes {tuple(loaded.shape)}"
                           + (f" (they were encoded with {made_by!r}: decode with that --model)" if made_by else ""))
    if not args.ignore_fingerprint:
        try:  # latents made under a prompt name it when another is given
            _prompt.check_record(loaded, latent, args.latents)
            _prompt.check_label_record(loaded, latent, args.latents)
        except ValueError as err:
            raise CommandError(one_line(err)) from None
        try:  # the fingerprint of the model in the latent's precision (the one it was encoded with)
            latent.check_model(in_dtype(loaded.flow, latent.dtype), loaded.model_kwargs or None)
        except ValueError:
            made_by = latent.info.get("model", "another model")
            raise CommandError(f"latents {args.latents!r} were encoded with {made_by!r} (fingerprint "
                               f"{latent.fingerprint}), not with --model {args.model!r}; decode with that model, or "
                               "pass --ignore-fingerprint to decode anyway") from None
    latent = latent.to(device)
    if latent.solver_state is None:  # a reversible latent keeps its exact (float64) state as it is
        latent.x = latent.x.to(dtype=dtype)
    latent.dtype = dtype  # the network's dtype: what the decode feeds it and returns
    result = decode(loaded.flow, latent, model_kwargs=loaded.model_kwargs or None, checks=Checks(model=False))
    written = write_images(_prompt.to_images(loaded, result.x), targets, formats, scale=args.scale)
    print(f"decoded {len(written)} image(s) with {result.solver}: {result.stats.nfe} NFE; wrote "
          f"{', '.join(os.fspath(p) for p in written[:3])}{', …' if len(written) > 3 else ''}")
    return 0


def cmd_roundtrip(args: argparse.Namespace) -> int:
    from ..api.sampling import decode

    outputs: list[tuple[Path, str]] = []
    if args.latents is not None:
        _check_latents_suffix(Path(args.latents), "--latents")
        outputs.append((Path(args.latents), "--latents"))
    names = [image_output_name(n) for n in relative_names(args.images)]
    if args.out is not None:
        out = output_dir(args.out)
        outputs += [(out / n, f"the reconstruction of {img!r}") for n, img in zip(names, args.images)]
    paths = plan(outputs, inputs=args.images, overwrite=args.overwrite)
    loaded, dtype, device = _setup(args, batch=len(args.images))
    images, formats, enc = _encode(args, loaded, dtype, device)
    dec = decode(loaded.flow, enc.latent, model_kwargs=loaded.model_kwargs or None)
    dec.x = _prompt.to_images(loaded, dec.x)
    if args.latents is not None:
        _save_latent(enc.latent, paths.pop(0))
    if args.out is not None:
        write_images(dec.x, paths, formats)
    from ..tools.metrics import reconstruction

    # the errors of the images as their files hold them (rounded to each file's depth, clipped to its range), which
    # for a latent model's decoder can be far from those of its unclipped output: both are printed, each named
    written = reconstruction(as_written(images, formats), as_written(dec.x, formats), encode_stats=enc.stats,
                             decode_stats=dec.stats)
    raw = reconstruction(images, dec.x)
    held = "written" if args.out is not None else "as they would be written (with --out)"
    print(f"round trip of {len(args.images)} image(s) with {enc.solver} on the {args.grid} grid, "
          f"{enc.latent.steps} steps: encode {written.nfe_encode} NFE, decode {written.nfe_decode} NFE; "
          f"errors on the [0, 1] pixel scale of the images {held}, rounded to each file's depth and clipped to "
          "its range:")
    print(f"  mse: {written.mse:.3e}")
    print(f"  max_abs_error: {written.max_abs:.3e}")
    print(f"  psnr_db: {written.psnr:.2f}")
    print(f"the decoder's output itself, before rounding and clipping: mse {raw.mse:.3e}, max_abs_error "
          f"{raw.max_abs:.3e}, psnr_db {raw.psnr:.2f}")
    if (line := _prompt.autoencoder_line(loaded, images, dec.x)) is not None:
        print(line)
    return 0
