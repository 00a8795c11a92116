"""A comparison as the report a researcher reads: one Markdown file with its figures beside it.

:func:`write_report` turns a :class:`flowdiff.Comparison` into, in one folder,

* ``frontier.png`` — the frontier: for each source (flowdiff on named grids, flowdiff on tuned grids,
  learned solvers on their fitted grids, each peer) the lowest RMS error at each NFE budget, log-log, each
  point named by the method that reached it. One line per source reads at a glance where the solver × grid
  detail does not.
* ``compare.png`` — that detail: a line per solver × grid (:meth:`Comparison.plot`).
* ``samples.png`` — the images (with ``compare(keep_images=k)``): a row per method, best first, a
  column per budget, the reference image in the first column; for the round-trip task
  (:func:`roundtrip_figure`) the inputs, the reconstructions of the best encoders and their error maps.
* ``compare.md`` — the facts of the run (model fingerprint, noise seed, the reference and its estimated
  error, the versions of flowdiff, torch and each peer), the best solver per budget with its grid, the
  command that reproduces the best flowdiff row, the figures and the full tables; ``compare.csv`` — every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..engine._files import atomic_path
from .compare import LEARNED_GRID, Comparison, Run
from .peers import FLOW_MATCHING_SET, peer_set, version

#: Where each file of a report goes, by role.
FILES = {"report": "compare.md", "csv": "compare.csv", "frontier": "frontier.png", "detail": "compare.png",
         "samples": "samples.png"}
#: Rows (methods) of the sample grid, ``samples.png``.
SAMPLE_ROWS = 4
#: The round-trip task's figure (:func:`roundtrip_figure`), beside the report.
ROUNDTRIP_FIGURE = "roundtrip.png"


def versions(peers: Sequence[str] = ()) -> dict[str, str]:
    """The versions of flowdiff, torch and each of ``peers`` installed here."""
    out = {"flowdiff": version("flowdiff"), "torch": torch.__version__}
    out.update({peer: version(peer) for peer in peers})
    return out


#: the frontier line of the diffusers peers on a flow-matching flow (on other flows their line is "diffusers")
_SET_LABELS = {FLOW_MATCHING_SET: "flow matching"}


def peer_sets(result: Comparison) -> dict[str, str]:
    """Per peer, which of its sets of samplers ran (or was left out) in ``result``: the diffusers peers are
    flow-matching schedulers on a flow-matching flow, VP schedulers built from the ᾱ table elsewhere."""
    out: dict[str, str] = {}
    for item in [*result.runs, *result.skipped]:
        which = peer_set(item.source, item.solver)
        if which is not None:
            out.setdefault(item.source, which)
    return out


def family(run: Run) -> str:
    """The frontier line a run belongs to: its peer, or flowdiff on named or on tuned grids, or a learned solver on
    its fitted grid (a line of its own: it is neither a named grid nor a tuned one)."""
    if run.source != "flowdiff":
        which = peer_set(run.source, run.solver)
        return f"{run.source}, {_SET_LABELS[which]}" if which in _SET_LABELS else run.source
    if run.grid == LEARNED_GRID:
        return "flowdiff, learned"
    return "flowdiff, tuned grid" if run.grid == "tuned" else "flowdiff, named grids"


def frontier(result: Comparison) -> dict[str, dict[int, Run]]:
    """Per :func:`family`, per budget, the run with the lowest RMS error."""
    out: dict[str, dict[int, Run]] = {}
    for run in result.runs:
        line = out.setdefault(family(run), {})
        if run.budget not in line or run.rms_error < line[run.budget].rms_error:
            line[run.budget] = run
    return out


def ranked_methods(result: Comparison) -> list[tuple[str, str, str]]:
    """(source, solver, grid) of every method, best first: by the mean over budgets of log RMS error,
    methods that ran at every budget before those that could not."""
    budgets = sorted({r.budget for r in result.runs})
    by_method: dict[tuple[str, str, str], list[float]] = {}
    for r in result.runs:
        by_method.setdefault((r.source, r.solver, r.grid), []).append(math.log(max(r.rms_error, 1e-300)))
    return sorted(by_method, key=lambda m: (len(by_method[m]) < len(budgets), sum(by_method[m]) / len(by_method[m])))


def frontier_plot(result: Comparison, path: str | Path, title: str | None = None) -> Path:
    """Write the frontier (best RMS error per source and NFE budget, log-log) as a PNG."""
    plt = _pyplot()
    lines = frontier(result)
    fig, ax = plt.subplots(figsize=(8.0, 5.0), dpi=120)
    markers = {"flowdiff, named grids": "o-", "flowdiff, tuned grid": "D-", "flowdiff, learned": "P-",
               "diffusers": "^--", "diffusers, flow matching": "^--", "k-diffusion": "v--"}
    # each line's labels on their own side of its points, so that lines that meet keep readable names
    offsets = [((5, 4), "left"), ((5, -10), "left"), ((-5, -10), "right"), ((-5, 4), "right")]
    for i, (name, per_budget) in enumerate(lines.items()):
        runs = [per_budget[b] for b in sorted(per_budget)]
        xs, ys = [r.nfe for r in runs], [max(r.rms_error, 1e-16) for r in runs]
        (line,) = ax.plot(xs, ys, markers.get(name, "s-"), markersize=5, label=name)
        offset, align = offsets[i % len(offsets)]
        for r, x, y in zip(runs, xs, ys):
            ax.annotate(f"{r.solver}/{r.grid}", (x, y), textcoords="offset points", xytext=offset, ha=align,
                        fontsize=6, color=line.get_color())
    floor = result.reference.error
    lowest = min((r.rms_error for r in result.runs), default=math.nan)
    if math.isfinite(floor) and floor > 0 and floor >= 1e-2 * lowest:
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1, label="reference error (est.)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(result.budgets, [str(b) for b in result.budgets])
    ax.minorticks_off()
    ax.margins(x=0.12)
    ax.set_xlabel("model evaluations (NFE used)")
    ax.set_ylabel("lowest RMS error vs reference")
    ax.set_title(title or "the frontier: best per source", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if lines:  # an empty legend is matplotlib's warning
        ax.legend(fontsize=8)
    return _save(fig, plt, path)


def sample_methods(result: Comparison, kept: Iterable[tuple[str, str, str, int]] | None = None,
                   rows: int = SAMPLE_ROWS) -> list[tuple[str, str, str]]:
    """The methods (source, solver, grid) :func:`sample_grid` shows, top to bottom: of those with kept images
    (the keys ``kept``, default those of ``result.images``), the best of each source (flowdiff on named grids,
    flowdiff on tuned grids, each peer), then the next best of :func:`ranked_methods`, ``rows`` in all.

    ``kept`` lets a process choose the rows before it holds the images (the ranks of
    :func:`flowdiff.runs.distributed.compare` send rank 0 only these)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    kept = set(result.images if kept is None else kept)
    shown = [m for m in ranked_methods(result) if any((*m, b) in kept for b in result.budgets)]
    lead: dict[str, tuple[str, str, str]] = {}  # the best method of each source first, then the next best
    for m in shown:
        lead.setdefault(m[0] if m[0] != "flowdiff" or m[2] != "tuned" else "tuned", m)
    return list(dict.fromkeys([*sorted(lead.values(), key=shown.index), *shown]))[:rows]


def shown_images(result: Comparison, kept: Iterable[tuple[str, str, str, int]] | None = None,
                 rows: int = SAMPLE_ROWS) -> list[tuple[str, str, str, int]]:
    """The keys (source, solver, grid, budget) of the images :func:`sample_grid` draws, in the order of ``kept``
    (default ``result.images``): the kept images of :func:`sample_methods`."""
    kept = list(result.images if kept is None else kept)
    methods = set(sample_methods(result, kept, rows))
    return [key for key in kept if key[:3] in methods]


def sample_grid(result: Comparison, path: str | Path, *, rows: int = SAMPLE_ROWS,
                to_images: Callable[[Tensor], Tensor] | None = None) -> Path:
    """Write the kept images (``compare(keep_images=k)``) as a PNG: a row per method of :func:`sample_methods`
    (the best of each source, then the next best, ``rows`` in all), the reference in the first column, then a
    column per budget.

    ``to_images`` maps a batch the flow made to images in [0, 1] (default: data in [−1, 1])."""
    if not result.images:
        raise ValueError("the comparison kept no images: run compare(..., keep_images=k) with k >= 1")
    convert = to_images or _unit_range
    kept = next(iter(result.images.values()))
    if to_images is None and not _drawable(tuple(kept.shape)):
        raise ValueError(f"sample_grid draws images, (N, C, H, W) with C = 1 to 4 or (N, H, W); the kept states have "
                         f"shape {tuple(kept.shape)} (pass to_images= to turn them into images)")
    methods = sample_methods(result, rows=rows)
    budgets = result.budgets
    k = next(iter(result.images.values())).shape[0]
    plt = _pyplot()
    fig, axes = plt.subplots(len(methods), len(budgets) + 1, squeeze=False,
                             figsize=(1.1 * k * (len(budgets) + 1) + 1.5, 1.2 * len(methods) + 0.6), dpi=120)
    reference = _strip(convert(result.reference.x[:k].detach().cpu().float()))
    for i, (source, solver, grid) in enumerate(methods):
        axes[i][0].imshow(reference, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        label = (f"{source}:\n" if source != "flowdiff" else "") + f"{solver}\n{grid}"
        axes[i][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        for j, budget in enumerate(budgets, start=1):
            x = result.images.get((source, solver, grid, budget))
            if x is not None:
                axes[i][j].imshow(_strip(convert(x.float())), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for j in range(len(budgets) + 1):
            axes[i][j].set_xticks([])
            axes[i][j].set_yticks([])
    axes[0][0].set_title("reference", fontsize=8)
    for j, budget in enumerate(budgets, start=1):
        axes[0][j].set_title(f"NFE {budget}", fontsize=8)
    return _save(fig, plt, path)


def roundtrip_figure(images: Tensor, reconstructions: Mapping[str, Tensor], path: str | Path, *,
                     to_images: Callable[[Tensor], Tensor] | None = None) -> Path:
    """Write the round trip as a PNG: the input images, then for each method its reconstructions and the
    map of |reconstruction − input| (white = an error of 0.1 or more in the images' [0, 1] scale)."""
    if not reconstructions:
        raise ValueError("reconstructions must name at least one method")
    convert = to_images or _unit_range
    inputs = convert(images.detach().cpu().float())
    plt = _pyplot()
    n = 1 + 2 * len(reconstructions)
    fig, axes = plt.subplots(n, 1, squeeze=False, figsize=(1.0 * inputs.shape[0] + 1.8, 1.1 * n + 0.4), dpi=120)
    panels = [("inputs", inputs, 1.0)]
    for name, x in reconstructions.items():
        recon = convert(x.detach().cpu().float())
        panels += [(f"{name}\nreconstruction", recon, 1.0), (f"{name}\n|error|", (recon - inputs).abs(), 0.1)]
    for ax, (label, x, top) in zip(axes[:, 0], panels):
        ax.imshow(_strip(x), cmap="gray" if top == 1.0 else "magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, plt, path)


def best_table(result: Comparison) -> str:
    """Per budget: the best of each source (markdown), with the NFE it spent in brackets where that is not the budget
    (as :meth:`Comparison.to_markdown` shows it: Heun at budget 10 spends 9)."""
    lines = frontier(result)
    names = list(lines)
    if not names:
        return "No run: every solver × grid × budget was skipped (the reasons are listed below the tables).\n"
    out = ["| NFE | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
    for budget in result.budgets:
        cells = []
        for name in names:
            r = lines[name].get(budget)
            cells.append("—" if r is None else f"{r.solver} / {r.grid}: {r.rms_error:.2e}"
                         + (f" ({r.nfe})" if r.nfe != budget else ""))
        out.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(result: Comparison, out: str | Path, *, facts: Mapping[str, str],
                 reproduce: Callable[[Run], str] | None = None, title: str = "flowdiff compare",
                 to_images: Callable[[Tensor], Tensor] | None = None,
                 figures: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Write the report of ``result`` into the folder ``out`` (see the module's docstring), each file atomically;
    the paths by role.

    ``facts`` are listed first (model, fingerprint, seed, reference, versions, …); ``reproduce(run)`` gives
    the command that reproduces a flowdiff row (the best one is shown); ``figures`` are further figures
    already written into ``out`` (caption → path), e.g. :func:`roundtrip_figure`'s.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {role: out / name for role, name in FILES.items()}
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(result.to_csv())
    with atomic_path(paths["frontier"]) as tmp:
        frontier_plot(result, tmp, title=f"{title}: the frontier")
    with atomic_path(paths["detail"]) as tmp:
        result.plot(tmp, title=f"{title}: every solver × grid")
    shape = tuple(result.reference.x.shape)
    drawable = to_images is not None or _drawable(shape)
    if result.images and drawable:
        with atomic_path(paths["samples"]) as tmp:
            sample_grid(result, tmp, to_images=to_images)
    else:
        del paths["samples"]
    md = [f"# {title}", ""]
    md += [f"- **{key}**: {value}" for key, value in facts.items()]
    md += [f"- **{peer} peers**: {which}" for peer, which in peer_sets(result).items()]
    md += [f"- **{peer} not run**: {why}" for peer, why in result.unavailable.items()]
    md += ["", "## Best per budget", "", best_table(result)]
    if result.runs:
        overall = [result.best(b) for b in result.budgets if any(r.budget == b for r in result.runs)]
        for best in overall:
            md.append(f"- NFE {best.budget}: best overall **{best.method}** (RMS error {best.rms_error:.2e}, "
                      f"NFE used {best.nfe})")
        mine = [r for r in result.runs if r.source == "flowdiff"]
        if reproduce is not None and mine:
            top = min(mine, key=lambda r: (-r.budget, r.rms_error))  # the best flowdiff row at the largest budget
            md += ["", f"The best flowdiff row at NFE {top.budget} ({top.solver} on {top.grid}), reproduced:", "",
                   "```sh", reproduce(top), "```"]
    md += ["", "## The frontier", "", f"![frontier]({FILES['frontier']})", ""]
    if "samples" in paths:
        md += ["## Samples", "", f"![samples]({FILES['samples']})", ""]
    elif result.images:
        md += [f"No sample grid: the states, of shape {shape}, are not images.", ""]
    for caption, path in (figures or {}).items():
        md += [f"## {caption}", "", f"![{caption}]({Path(path).name})", ""]
    md += ["## Best per solver (its best grid)", "", result.to_markdown("best"),
           "## Every solver × grid", "", f"![detail]({FILES['detail']})", "", result.to_markdown("wide")]
    if result.skipped:
        md += ["Skipped:", ""] + [f"- {s.source} {s.solver} on {s.grid} at NFE {s.budget}: {s.reason}"
                                  for s in result.skipped] + [""]
    md += [f"Every run, with NFE used, steps, max error and wall time: [{FILES['csv']}]({FILES['csv']})", ""]
    with atomic_path(paths["report"]) as tmp:
        tmp.write_text("\n".join(md))
    return paths


def _unit_range(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) / 2).float()


def _drawable(shape: tuple[int, ...]) -> bool:
    """Whether states of ``shape`` are a batch of images: (N, H, W), or (N, C, H, W) of grey (+ alpha) or RGB(A)."""
    return len(shape) == 3 or (len(shape) == 4 and 1 <= shape[1] <= 4)


def _strip(x: Tensor) -> Tensor:
    """A batch (N, C, H, W) as one image (H, N·(W + 1)) or (H, N·(W + 1), 3), one pixel apart: grey for C = 1 and
    grey + alpha, RGB for RGB and RGBA (an alpha channel is not drawn)."""
    if x.ndim == 3:
        x = x.unsqueeze(1)
    n, c, h, w = x.shape
    x = torch.nn.functional.pad(x, (0, 1))
    strip = x.permute(2, 0, 3, 1).reshape(h, n * (w + 1), c)[:, :-1]
    return (strip[..., 0] if c <= 2 else strip[..., :3]).clamp(0, 1).numpy()


def _pyplot():  # noqa: ANN202 - matplotlib's module
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:  # noqa: ANN001
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
