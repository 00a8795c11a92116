"""The README's prose checked against the code: defaults, name lists, counts and the command line's own words.

``tests/test_docs.py`` runs every README code block; this file checks the concrete claims made *around* them, each one
that a new user reading the README top to bottom found untrue (the test's docstring says what the README or the code
said before). The README is parsed for the claim, so that a change on either side that breaks it fails here.
"""

import re
from pathlib import Path

import pytest

import flowdiff
import solvers
from flowdiff.cli import main
from flowdiff.cli._parser import build_parser
from flowdiff.engine.plugins import plugins

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    """The README's text from ``heading`` (a whole line) to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = README.index(f"\n{heading}\n") + 1
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(README, start + len(heading))
    return README[start:end.start() if end else len(README)]


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the Markdown table in ``text`` whose header line starts with ``header``."""
    lines = text[text.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _names(cell: str) -> set[str]:
    """The backticked names of a table cell, leaving out what its parentheses say about them."""
    while True:
        shorter = re.sub(r"\([^()]*\)", "", cell)
        if shorter == cell:
            return set(re.findall(r"`([a-z0-9_]+)`", cell))
        cell = shorter


def test_the_solvers_table_lists_every_registered_method_and_plugin():
    """The family table of *Solvers* left out the registered ``deis`` (which `compare` runs by default)."""
    rows = _table(_section("### Solvers"), "| family | names |")
    listed = set().union(*(_names(names) for _, names in rows))
    assert listed == set(solvers.available()) | set(plugins("solver"))


def test_the_low_nfe_table_is_the_multistep_methods_with_their_orders():
    """The *Low-NFE solvers* table: one row per multistep method, and a row's numeric order is the solver's."""
    rows = _table(_section("### Low-NFE solvers"), "| name | method | order | variables |")
    names = [re.fullmatch(r"`([a-z0-9_]+)`", row[0]).group(1) for row in rows]
    assert sorted(names) == solvers.available(multistep=True)
    for name, (_, _, order, _) in zip(names, rows, strict=True):
        number = re.match(r"\d+", order)
        if number:
            assert solvers.get(name).order == int(number.group()), name


def test_the_training_split_has_the_size_the_readme_gives():
    """The *Likelihood* section said the shipped model had 1437 training digits; the split holds 1433."""
    whole = r"(\d[\d,]{2,}) "  # a count of the whole split (a handful, "4 training digits", is a subset)
    said = {int(n.replace(",", "")) for n in re.findall(whole + "training digits", README)}
    assert said == {len(flowdiff.digits_data("train").images)}
    held_out = {int(n.replace(",", "")) for n in re.findall(whole + "held-out digits", README)}
    assert held_out == {len(flowdiff.digits_data("test").images)}


def _subcommands() -> dict:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


def _option(command: str, flag: str):
    (action,) = (a for a in _subcommands()[command]._actions if flag in a.option_strings)
    return action


def test_every_commands_device_default_is_the_one_the_readme_states():
    """The README said every command's ``--device`` defaults to the GPU when torch sees one; ``likelihood``'s is
    the CPU. The sentence now names the exception, and this keeps the two in step."""
    sentence = re.search(r"`--device` \(default: ([^)]*)\)", README).group(1)
    exceptions = dict(re.findall(r"`(\w+)`: the (\w+)", sentence))
    for command in _subcommands():
        default = _option(command, "--device").default
        if command in exceptions:
            assert default == exceptions[command].lower(), command
        else:
            assert default == "auto", command


def test_fixed_point_help_names_the_method_that_runs():
    """``--fixed-point``'s help said "(Newton-Krylov)"; it runs ``Inversion("fixed_point")``'s default, "hybrid":
    Anderson mixing first, then Newton–Krylov (the README's *Fixed-point inversion*)."""
    assert "`\"hybrid\"` (default)" in README
    for command in ("encode", "roundtrip"):
        text = _option(command, "--fixed-point").help
        assert "Anderson" in text and "Newton" in text, command


def test_sample_writes_the_format_its_out_suffix_names(tmp_path, capsys):
    """``sample``'s help said "output PNG" / "one PNG grid"; as the README's table says, the suffix picks the format
    (``--out s.tif`` writes a TIFF), and the help now says so."""
    from flowdiff.runs.imageio import read_image

    assert main(["sample", "--steps", "1", "--num", "2", "--out", str(tmp_path / "s.tif")]) == 0
    assert read_image(tmp_path / "s.tif")[1].bits == 8
    assert (tmp_path / "s.tif").read_bytes()[:2] in (b"II", b"MM")  # a TIFF, not a PNG under another name
    assert "suffix picks the format" in _option("sample", "--out").help
    assert "the suffix picks the format" in README
    commands = build_parser()._subparsers._group_actions[0]._choices_actions
    summary = {c.dest: c.help for c in commands}
    assert "PNG" not in summary["decode"] and "PNG" not in _option("sample", "--scale").help


def test_the_architecture_file_table_names_every_module_and_only_modules_that_exist():
    """The file table of *How the code is laid out* left out ``solvers/_deis.py``, ``solvers/_checks.py`` and three of
    ``flowdiff/cli/``'s modules (``_argtypes.py``, ``_errors.py``, ``_learned.py``). A cell names a path, then bare
    file names in the same folder; the ``flowdiff/cli/`` row names its files in its second cell."""
    root = Path(__file__).resolve().parents[1]
    named = set()
    for files, what in (row[:2] for row in _table(_section("## How the code is laid out"), "| file | what it is |")):
        folder = None
        for token in re.findall(r"`([^`]+)`", files):
            if token.endswith("/"):
                folder = Path(token)
                named |= {folder / name for name in re.findall(r"`([\w.]+\.py)`", what)}
            elif "/" in token:
                folder = Path(token).parent
                named.add(Path(token))
            else:
                named.add(folder / token)
    assert [str(p) for p in sorted(named) if not (root / p).exists() and not str(p).startswith("benchmarks")] == []
    modules = {p.relative_to(root) for top in ("solvers", "flowdiff") for p in (root / top).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert sorted(map(str, modules - named)) == []


def test_the_entry_points_take_the_keywords_the_readme_lists():
    """*A small surface*: ``generate`` and ``encode`` take ten keywords, ``decode`` the same but ``adaptive``."""
    import inspect

    said = re.search(r"take at most ten keywords —\s*(.*?)\s*— and everything rarer", README, re.S).group(1)
    listed = re.findall(r"`(\w+)`", said)
    assert len(listed) == 10
    for entry in (flowdiff.generate, flowdiff.encode, flowdiff.decode):
        keywords = [p.name for p in inspect.signature(entry).parameters.values() if p.kind is p.KEYWORD_ONLY]
        expected = [k for k in listed if not (entry is flowdiff.decode and k == "adaptive")]
        assert sorted(keywords) == sorted(expected), entry.__name__


def test_the_option_objects_defaults_are_the_ones_the_readme_spells():
    """``checks=flowdiff.Checks(finite=True, growth="auto", model=True)`` is spelt with its defaults; the README's
    ``Adaptive`` knobs and ``StepController`` fields are the classes' own."""
    import ast
    import dataclasses

    spelt = re.search(r"`checks=flowdiff\.Checks\(([^)]*)\)`", README).group(1)
    defaults = {f.name: f.default for f in dataclasses.fields(flowdiff.Checks)}
    assert {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in spelt.split(", "))} == defaults
    knobs = re.search(r"Knobs \(fields of `flowdiff\.Adaptive`\): (.*?)\.\s+`startup_order", README, re.S).group(1)
    fields = re.split(r",\s+", re.search(r"StepController\(([^)]*)\)", knobs).group(1))
    assert fields == [f.name for f in dataclasses.fields(solvers.StepController)]
    others = re.findall(r"`(\w+)`", re.sub(r"`controller=.*?\)`", "", knobs, flags=re.S))
    assert {"controller", *others, "rtol", "atol", "max_nfe"} == {f.name for f in dataclasses.fields(flowdiff.Adaptive)}


def test_a_saved_end_state_has_an_x0_only_in_the_data_variables():
    """*Saved states* said the end state carries no x̂₀ (``None``); in the data variables (``dpmpp_2m``, ``unipc``)
    the end state at σ = 0 is its own x̂₀, which the record carries. The README now says which."""
    import torch

    from flowdiff.engine.formulations import Data, formulation_for
    from flowdiff.models.analytic import Gaussian

    flow = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5).flow()
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert "whose end state is its own x̂₀ there" in _section("## Using it")
    for name in ("euler", "heun", "lms", "abm", "dpmpp_2m", "unipc", "deis"):
        res = flowdiff.generate(flow, noise, solver=name, steps=4, save=flowdiff.Save(steps=True, denoised=True))
        end = res.saved[-1]
        assert end.sigma == 0.0 and all(s.denoised is not None for s in res.saved[:-1]), name
        if isinstance(formulation_for(solvers.get(name), "generate"), Data):
            assert torch.equal(end.denoised, end.x), name
        else:
            assert end.denoised is None, name


def test_every_name_path_and_flag_the_readme_mentions_exists():
    """Every ``flowdiff.…``/``solvers.…`` name resolves, every repository path and test named exists, every
    ``--flag`` of a ``flowdiff COMMAND`` line is that command's, and every flag of a ``python benchmarks/X.py`` line
    is in X.py."""
    import importlib

    def resolve(dotted: str) -> object:
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for part in parts[i:]:
                obj = getattr(obj, part)
            return obj

    for dotted in set(re.findall(r"`((?:flowdiff|solvers)(?:\.[A-Za-z_]\w*)+)", README)):
        resolve(dotted)
    root = Path(__file__).resolve().parents[1]
    for path in set(re.findall(r"`((?:benchmarks|examples|tests|docs|training|flowdiff|solvers)/[\w./*…-]+)`", README)):
        assert list(root.glob(path.replace("…", "*"))), path
    tests = "".join(p.read_text(encoding="utf-8") for p in (root / "tests").glob("test_*.py"))
    for name in set(re.findall(r"`(test_\w+)`", README)):
        assert f"def {name}(" in tests, name
    options = {name: {o for a in sp._actions for o in a.option_strings} for name, sp in _subcommands().items()}
    for command, rest in re.findall(rf"flowdiff ({'|'.join(options)})\b([^`\n]*)", README):
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w-])", rest):
            assert flag in options[command], (command, flag)
    for script, rest in re.findall(r"python (benchmarks/[\w/]+\.py)([^`\n;)]*)", README):
        source = (root / script).read_text(encoding="utf-8")
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?![\w-])", rest):
            assert f'"{flag}"' in source, (script, flag)


def test_compares_defaults_are_the_ones_the_readme_lists():
    """*Which solver for N model evaluations?*: the default solvers (Euler, Heun and every registered multistep
    method, listed by name), grids and budgets of ``flowdiff compare``."""
    from flowdiff.tools.compare import DEFAULT_GRIDS, DEFAULT_NFE, default_solvers

    said = re.search(r"\(default: Euler = DDIM, Heun, and every registered multistep\s+solver — ([^;]*); grids "
                     r"([^;]*) and the shipped\s+tuned grids; budgets ([^)]*)\)", README)
    multistep, grids, budgets = (re.split(r",\s*|\s+and\s+", g.strip()) for g in said.groups())
    assert multistep == solvers.available(multistep=True)
    assert default_solvers() == ["euler", "heun", *multistep]
    assert tuple(grids) == DEFAULT_GRIDS and tuple(map(int, budgets)) == DEFAULT_NFE


def test_a_folder_runs_outputs_are_where_the_readme_says(tmp_path, monkeypatch, capsys):
    """*A folder of images*: the ``encode --data digits --out latents`` line's comment named
    ``latents/0/d1.png.safetensors``; the latent is at ``OUT/latents/REL.safetensors`` (the table's rule, and the
    path the next line decodes). The summary's figures were said to be p50/p90/p99 and NFE totals; PSNR's are p10/p1
    (lower is worse) and the NFE is per image, min/mean/max."""
    import json

    from flowdiff.runs.imageio import ImageFormat, from_data, write_image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits" / "0").mkdir(parents=True)
    fmt = ImageFormat("L", 8)
    for i, image in enumerate(flowdiff.digits_data("test").images[:2].double()):
        write_image(tmp_path / "digits" / "0" / f"d{i}.png", from_data(image, fmt), fmt)
    (line,) = re.findall(r"^flowdiff encode --data digits --out latents .*$", README, re.M)
    command, comment = (part.strip() for part in line.split("#"))
    assert main([*command.split()[1:], "--steps", "2"]) == 0
    assert (tmp_path / comment.removesuffix(", ...")).is_file()
    (decoded,) = re.findall(r"^flowdiff decode (latents/\S+)", README, re.M)
    assert (tmp_path / decoded).is_file()
    assert main(["roundtrip", "--data", "digits", "--out", "recon", "--steps", "2"]) == 0
    summary = json.loads((tmp_path / "recon" / "summary.json").read_text())
    said = re.search(r"then a\s+summary \((.*?)\) printed", README, re.S).group(1)
    assert "p10 and p1 for PSNR" in said and set(summary["psnr"]) == {"mean", "p50", "p10", "p1", "worst"}
    assert set(summary["mse"]) == {"mean", "p50", "p90", "p99", "worst"}
    assert "min, mean and max" in said and set(summary["nfe_encode"]) == set(summary["nfe_decode"]) == {"min", "mean",
                                                                                                       "max"}


def test_an_output_named_as_another_outputs_folder_is_refused_before_the_work(tmp_path, monkeypatch, capsys):
    """*Checked before the work*: two outputs with one name end with status 2 before the model is loaded.
    ``roundtrip x.png --latents L --out L`` (the latents file and the reconstructions' folder one name) ran the
    encode and decode, then failed writing the latents (status 1)."""
    from flowdiff.runs.imageio import ImageFormat, from_data, write_image

    monkeypatch.chdir(tmp_path)
    fmt = ImageFormat("L", 8)
    write_image(tmp_path / "x.png", from_data(flowdiff.digits_data("test").images[0].double(), fmt), fmt)
    monkeypatch.setattr(flowdiff, "encode", lambda *a, **k: pytest.fail("the encode ran"))
    assert main(["roundtrip", "x.png", "--steps", "2", "--latents", "l.safetensors", "--out", "l.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "'l.safetensors'" in err and "--latents" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_deis_generates_as_the_readme_says():
    """The *Low-NFE solvers* table described ``deis`` as Adams in σ with ε extrapolated in log σ; from b74a095 to D6
    a generation down to σ = 0 was ``lms(order=3)`` bit for bit, and the table said so. DEIS's log-σ weights are
    back on every step away from σ = 0 (``Adams(log_time_by_step=True)``): the table says that, and the
    generation down to 0 differs from lms(order=3) as the one ending above 0 does."""
    import torch

    from flowdiff.models.analytic import Mixture

    (row,) = [r for r in _table(_section("### Low-NFE solvers"), "| name | method |") if r[0] == "`deis`"]
    assert "in a generation down to 0 too" in row[1] and "bit for bit" not in row[1]
    flow = Mixture(torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), 0.5).flow()
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = flowdiff.make_sigmas(flow.schedule, "logsnr", 8)
    lms = solvers.get("lms", order=3)
    assert sigmas[-1] == 0.0
    for grid in (sigmas, sigmas[:-1]):  # down to σ = 0, and ending at σ_min
        assert not torch.equal(flowdiff.generate(flow, noise, solver="deis", grid=grid).x,
                               flowdiff.generate(flow, noise, solver=lms, grid=grid).x)


def test_the_docs_index_lists_every_example_script():
    """``docs/index.md``'s row for the examples page left out ``noise_optimisation.py``'s job; the README's
    *Documentation* and ``docs/examples.md`` list one job per script in ``examples/``."""
    root = Path(__file__).resolve().parents[1]
    scripts = sorted(p.name for p in (root / "examples").glob("*.py"))
    listed = re.findall(r"^\| `(\w+\.py)` \|", (root / "docs" / "examples.md").read_text(encoding="utf-8"), re.M)
    assert sorted(listed) == scripts
    row = next(line for line in (root / "docs" / "index.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| [Examples]"))
    jobs = row.split("examples/`:")[1].strip(" |").split(", ")
    assert len(jobs) == len(scripts), jobs
    said = re.search(r"`examples/` has short runnable scripts for the main jobs: (.*?)\. Every code block", README,
                     re.S).group(1)
    assert len(re.split(r",\s+", said)) == len(scripts)


def test_every_option_with_a_default_states_it_in_its_help():
    """``flowdiff COMMAND --help`` documents every option (the README): ``compare --task`` and ``likelihood
    --solver`` did not say their defaults (``generate``, ``dopri5``)."""
    import argparse

    for command, parser in _subcommands().items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction) \
                    or action.default in (None, False, argparse.SUPPRESS):
                continue
            value = ",".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert "default" in action.help and value in action.help, (command, action.option_strings, action.help)


def test_round_trip_order_refuses_an_exact_round_trip_at_float_rounding():
    """*Property tests for your model*: ``round_trip_order`` refuses an exact round trip, whose error has no order.
    It refused errors of exactly 0 only: reversible Heun in float64 comes back within a few ulps, and the "order"
    fitted to those was a number (≈ 0) like any other."""
    import torch

    from flowdiff.models.analytic import Gaussian
    from flowdiff.tools import testing as ft

    assert "`round_trip_order`, which refuses repeated step counts and an exact round trip" in README
    model = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5)
    images = model.sample(3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="exact round trip"):
        ft.round_trip_order(model.flow(), images, [4, 8, 16], solver="reversible_heun")
    order, errors = ft.round_trip_order(model.flow(), images, [4, 8, 16], solver="euler")
    assert errors[0] > errors[1] > errors[2] and 0.5 < order < 1.5


def test_the_readme_names_every_public_name_of_flowdiff():
    """The README documents everything: seven names of ``flowdiff.__all__`` (``GRIDS``, ``PREDICTION_TYPES``,
    ``grid_timesteps``, ``DiffusersFlow``, ``SchedulerPlan``, ``Comparison`` and an alias since removed) appeared
    nowhere in it. Each is now named where a user meets it."""
    named = re.findall(r"(?<![\w.])(?:flowdiff\.)?([A-Za-z_]\w*)", README)
    assert sorted(set(flowdiff.__all__) - set(named)) == []


def test_compare_writes_the_files_the_readme_table_lists(tmp_path, monkeypatch, capsys):
    """*What each command writes*: ``compare --task roundtrip`` was said to write ``samples.png`` and the reference
    beside ``roundtrip.png``; it writes neither (no reference solve, no samples)."""
    monkeypatch.chdir(tmp_path)
    (row,) = [r for r in _table(README, "| command | writes | named |") if r[0] == "`compare`"]
    generate, roundtrip = row[1].split("; for `--task roundtrip`, ")
    written = set(re.findall(r"`(\w+\.\w+)`", generate))
    assert main(["compare", "--task", "roundtrip", "--solver", "euler", "--nfe", "2", "--batch", "1", "--grid",
                 "logsnr", "--device", "cpu", "--out", "rt", "--no-progress"]) == 0
    assert "`roundtrip.png` instead of `samples.png` and no reference" in roundtrip
    assert {p.name for p in (tmp_path / "rt").iterdir()} == written - {"samples.png", "reference.safetensors"} | {
        "roundtrip.png"}
    assert main(["compare", "--solver", "euler", "--nfe", "2", "--batch", "1", "--grid", "logsnr", "--rtol", "1e-3",
                 "--device", "cpu", "--out", "gen", "--no-progress"]) == 0
    assert {p.name for p in (tmp_path / "gen").iterdir()} == written
