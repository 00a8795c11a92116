"""What the docs pages, the example scripts and the public docstrings claim, checked against the code.

A new user reads ``docs/*.md``, the ``examples/`` scripts and ``help(flowdiff.generate)``; each test here
re-measures a concrete claim of theirs (a name that exists, a flag a script takes, a default, which grids
end where) so that the text and the code cannot drift apart unnoticed.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.engine import plugins
from flowdiff.models.analytic import Gaussian

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def _public_docstrings() -> dict[str, str]:
    """Every public name's docstring (and its public methods' and properties'), keyed by dotted name."""
    out: dict[str, str] = {}
    for module in (flowdiff, solvers):
        for name in module.__all__:
            obj = getattr(module, name)
            out[f"{module.__name__}.{name}"] = inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if not attr.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                        out[f"{module.__name__}.{name}.{attr}"] = inspect.getdoc(value) or ""
    return out


def _texts() -> dict[str, str]:
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOCS + EXAMPLES}
    texts.update(_public_docstrings())
    return texts


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


# ``flowdiff.X.Y`` / ``solvers.X`` not preceded by a dot or a word character (``args.solvers.split`` is not one).
_CITED = re.compile(r"(?<![\w./])((?:flowdiff|solvers)(?:\.[A-Za-z_]\w*)+)(?!\.?\w)")


def test_every_cited_flowdiff_or_solvers_name_exists():
    missing = sorted({(where, m.group(1)) for where, text in _texts().items() for m in _CITED.finditer(text)
                      if not _resolves(m.group(1))})
    assert not missing, f"names cited in the docs, examples or docstrings that do not exist: {missing}"


def test_quoted_solver_and_grid_names_are_registered():
    # registered solvers, and the encode-only methods of the plug-in table (``ddim_inverse``)
    registered = set(solvers.available()) | set(plugins.plugins())
    grids = set(flowdiff.GRIDS)
    bad = []
    for where, text in _texts().items():
        for name in re.findall(r"""\bsolver=["']([a-z0-9_]+)["']""", text):
            if name not in registered:
                bad.append((where, "solver", name))
        for name in re.findall(r"""solvers\.get\(["']([a-z0-9_]+)["']""", text):
            if name not in registered:
                bad.append((where, "solver", name))
        for name in re.findall(r"""\bgrid=["']([a-z0-9_]+)["']""", text):
            if name not in grids:
                bad.append((where, "grid", name))
    assert not bad, f"solver or grid names in the docs that are not registered: {bad}"


def _script_flags(script: Path) -> set[str]:
    return set(re.findall(r"""add_argument\(\s*["'](--[\w-]+)["']""", script.read_text(encoding="utf-8"))) | {"--help"}


def test_example_command_lines_use_flags_the_scripts_take():
    """Every ``python examples/X.py --flag ...`` line in the docs pages and the scripts' docstrings."""
    bad = []
    for where, text in _texts().items():
        for script, rest in re.findall(r"python examples/(\w+\.py)([^\n`]*)", text):
            path = ROOT / "examples" / script
            assert path.is_file(), f"{where} runs examples/{script}, which does not exist"
            for flag in re.findall(r"(?<!\S)(--[\w-]+)", rest):
                if flag not in _script_flags(path):
                    bad.append((where, script, flag))
    assert not bad, f"flags given to example scripts that they do not define: {bad}"


def test_examples_page_lists_every_script_with_the_files_it_writes():
    page = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+\.py)` \|[^|]*\| ([^|]*) \|$", page, flags=re.M))
    assert set(rows) == {p.name for p in EXAMPLES}, (sorted(rows), [p.name for p in EXAMPLES])
    for script, writes in rows.items():
        source = (ROOT / "examples" / script).read_text(encoding="utf-8")
        for name in re.findall(r"`([\w.]+)`", writes):
            assert f'"{name}"' in source or f"'{name}'" in source, f"docs/examples.md: {script} writes {name}?"
        assert "FLOWDIFF_OUT" in source and '"--out"' in source, f"{script} takes no --out / $FLOWDIFF_OUT"


def test_reference_solution_names_the_grids_that_end_at_sigma_min():
    """Its docstring says which named grids' last positive σ is the schedule's σ_min; measure each grid."""
    doc = " ".join((inspect.getdoc(flowdiff.reference_solution) or "").split())
    claim = re.search(r"the grids (.*?) end there and (.*?) approach", doc)
    assert claim, "reference_solution's docstring no longer says which grids end at σ_min"
    said_end = set(re.findall(r"``(\w+)``", claim.group(1)))
    said_approach = set(re.findall(r"``(\w+)``", claim.group(2)))
    schedule = flowdiff.pretrained("digits").schedule
    measured = {grid for grid in flowdiff.GRIDS
                if all(np.isclose(flowdiff.make_sigmas(schedule, grid, n)[-2], schedule.sigma_min) for n in (5, 20))}
    assert said_end == measured
    assert said_approach == set(flowdiff.GRIDS) - measured


_DEFAULT = re.compile(r"``(\w+)``[^`]{0,80}?\(default ``([^`]+)``\)")


@pytest.mark.parametrize("where", sorted(_public_docstrings()))
def test_documented_literal_defaults_are_the_signature_defaults(where):
    """``name`` ... (default ``V``) in a public docstring, V a Python literal, is the parameter's default."""
    obj = eval(where, {"flowdiff": flowdiff, "solvers": solvers})  # noqa: S307 - a dotted public name
    if not callable(obj):
        return
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    for name, value in _DEFAULT.findall(inspect.getdoc(obj) or ""):
        try:
            literal = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
        if name in parameters:
            assert parameters[name].default == literal, (where, name, value, parameters[name].default)


def test_make_sigmas_documented_grid_option_defaults():
    """make_sigmas: ``rho`` (karras, default 7), ``power`` (logsnr, default 1), σ range the schedule's."""
    doc = " ".join((inspect.getdoc(flowdiff.make_sigmas) or "").split())
    rho = float(re.search(r"``rho`` \(karras, default ([\d.]+)\)", doc).group(1))
    power = float(re.search(r"``power`` \(logsnr, default ([\d.]+)\)", doc).group(1))
    schedule = flowdiff.pretrained("digits").schedule
    np.testing.assert_array_equal(flowdiff.make_sigmas(schedule, "karras", 10),
                                  flowdiff.make_sigmas(schedule, "karras", 10, rho=rho))
    np.testing.assert_array_equal(flowdiff.make_sigmas(schedule, "logsnr", 10),
                                  flowdiff.make_sigmas(schedule, "logsnr", 10, power=power))
    for grid in ("karras", "logsnr"):
        np.testing.assert_array_equal(
            flowdiff.make_sigmas(schedule, grid, 10),
            flowdiff.make_sigmas(schedule, grid, 10, sigma_min=schedule.sigma_min, sigma_max=schedule.sigma_max))


def _argument_defaults(script: Path) -> dict[str, tuple[object, str]]:
    """``--flag`` → (its literal default, or None when it has none or a computed one; its help text), by AST."""
    out: dict[str, tuple[object, str]] = {}
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
            keywords = {k.arg: k.value for k in node.keywords}
            try:
                default = ast.literal_eval(keywords["default"]) if "default" in keywords else None
            except ValueError:
                default = None
            text = ast.literal_eval(keywords["help"]) if "help" in keywords else ""
            out[node.args[0].value] = (default, " ".join(text.split()))
    return out


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_help_defaults_are_the_parser_defaults(script):
    """``(default: V)`` in a flag's help is its default; "drop ``--flag``" in the docstring needs no default."""
    arguments = _argument_defaults(script)
    for flag, (default, text) in arguments.items():
        said = re.search(r"\(default:? ([-\w.]+)[;)]", text)
        if said and default is not None:
            value = float(said.group(1)) if isinstance(default, (int, float)) else said.group(1)
            assert default == value, f"{script.name} {flag}: help says {said.group(1)}, default {default!r}"
    doc = " ".join((ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or "").split())
    for flag in re.findall(r"drop ``(--[\w-]+)``", doc):
        assert arguments[flag][0] is None, (f"{script.name}'s docstring says to drop {flag} for another behaviour, "
                                            f"but leaving it out gives its default {arguments[flag][0]!r}")


def test_flow_fingerprint_reads_what_its_docstring_says():
    """``flow_fingerprint``: a bound method's object is read (as the model or as a σ field), a plain-function σ
    field is a ``TypeError``. A bound method given as the model was digested as nothing of its object: two
    Gaussians' ``eps`` had one fingerprint (a latent of one decoded under the other unchecked)."""
    doc = " ".join(inspect.getdoc(flowdiff.flow_fingerprint).split())
    assert "bound method" in doc and "raises ``TypeError``" in doc
    first, second = Gaussian(torch.zeros(4), 0.5), Gaussian(torch.ones(4), 0.5)
    keys = {flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(g.eps, g.schedule)) for g in (first, second)}
    assert len(keys) == 2
    # one object's field, as the model (a bound method) or as the σ field, is digested from the same tensors
    assert flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow(first.eps, first.schedule)) == \
        flowdiff.flow_fingerprint(first.flow())
    with pytest.raises(TypeError, match="cannot fingerprint a model of type function"):
        flowdiff.flow_fingerprint(flowdiff.ProbabilityFlow.from_sigma_field(lambda xbar, sigma: xbar, first.schedule))
