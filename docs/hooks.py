"""MkDocs hooks: the API reference pages from ``__all__``, and the benchmark results as pages of the site.

Both are generated at build time so that a name added to ``flowdiff/__init__.py``'s or
``solvers/__init__.py``'s ``__all__``, or a table or plot added under ``benchmarks/results/``, is in
the site without editing a page. ``__all__`` and the imports are read with ``ast`` (nothing is
imported), and each name is listed under the module it is imported from, in ``__all__``'s order.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "flowdiff": "The diffusion layer: flows of models and schedules, generate / encode / decode, "
                "comparison, models, metrics.",
    "solvers": "The ODE layer: `dy/dt = f(t, y)` over tensors, solvers, drivers, registry; it knows nothing "
               "of diffusion.",
}
RESULTS = ROOT / "benchmarks" / "results"


def exported_names(package: str) -> list[tuple[str, str]]:
    """``(name, module it comes from)`` for each name of ``package/__init__.py``'s ``__all__``, in order."""
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    origin: dict[str, str] = {}
    names: list[str] | None = None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                origin[alias.asname or alias.name] = f"{package}.{node.module}" if node.module else package
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = list(ast.literal_eval(node.value))
    if names is None:
        raise ValueError(f"{package}/__init__.py has no literal __all__ to document")
    missing = [n for n in names if n not in origin]
    if missing:
        raise ValueError(f"{package}/__init__.py: {missing} in __all__ but not imported with 'from . import'")
    return [(n, origin[n]) for n in names]


def api_page(package: str) -> str:
    """One page: a section per source module, a mkdocstrings entry per exported name."""
    pairs = exported_names(package)
    lines = [f"# `{package}`", "", PACKAGES[package], "",
             f"Every public name of `{package}` (its `__all__`), grouped by the module that defines it. "
             "Generated from the docstrings at build time.", ""]
    modules: dict[str, list[str]] = {}
    for name, module in pairs:
        modules.setdefault(module, []).append(name)
    for module, names in modules.items():
        title = module if module.count(".") else f"{module} (submodules)"
        lines += [f"## `{title}`", ""]
        for name in names:
            lines += [f"::: {package}.{name}", ""]
    return "\n".join(lines)


def on_files(files, config):
    for package in PACKAGES:
        files.append(File.generated(config, f"api/{package}.md", content=api_page(package)))
    files.append(File.generated(config, "benchmarks/RESULTS.md", abs_src_path=str(ROOT / "benchmarks" / "RESULTS.md")))
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".png", ".svg", ".csv"):
            files.append(File.generated(config, f"benchmarks/results/{path.name}", abs_src_path=str(path)))
    return files


def results_index() -> str:
    """Links to every full table of benchmarks/results/ and every plot there, embedded."""
    lines = ["Full tables, one page per benchmark (each with the exact command that made it):", ""]
    for path in sorted(RESULTS.glob("*.md")):
        heading = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                        if line.startswith("#")), path.stem)
        lines.append(f"- [{heading}](benchmarks/results/{path.name})")
    for path in sorted([*RESULTS.glob("*.png"), *RESULTS.glob("*.svg")]):
        lines += ["", f"![{path.stem}](benchmarks/results/{path.name})", "",
                  f"*`benchmarks/results/{path.name}`*"]
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown, page, config, files):
    if "<!-- results-index -->" in markdown:
        markdown = markdown.replace("<!-- results-index -->", results_index())
    return markdown
