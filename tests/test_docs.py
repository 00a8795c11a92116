"""Every example in README.md and docs/*.md runs, and the documentation site builds without a warning.

A fenced ```` ```python ```` block is a test: it runs in a fresh namespace with the working directory
a fresh temporary folder (blocks write files), one torch thread. An HTML comment on the line just
before a block changes that (several comments may stand on consecutive lines):

- ``<!-- continue -->``: run in the namespace left by the previous python block of the same file
  (a block that needs ``flow`` or ``images`` from the one before says so).
- ``<!-- skip: reason -->``: not run; the reason is required and shown by pytest. Use sparingly.
- ``<!-- fixture: NAME[, NAME] -->``: before the block, make files it refers to in the working
  folder (see ``FIXTURES``: a tiny random diffusers pipeline at ``path/to/ddpm-pipeline``, two
  digit PNGs ``a.png`` and ``b.png``, a tiny Flux pipeline at ``path/to/flux`` with ``photo.png``, six digit
  PNGs in a folder tree ``digits/``).
- ``<!-- shrink: ARGS -->`` (``sh`` blocks): append ARGS to each ``flowdiff`` line (a later option
  overrides an earlier one), to run a smaller variant of a command that takes minutes as written.

A function ``test_*`` that a python block defines is called after the block (with no arguments, as
pytest would collect it from a user's test file; hypothesis' ``@given`` runs its examples).

An ``sh``/``bash`` block runs its ``flowdiff ...`` lines in order, in one subprocess, in one
temporary folder; each must exit 0. ``make ...`` lines are not run: ``make test`` is what runs this
file, on the set-up ``make setup`` made. Any other command in a block that is not marked skip is an
error, so that no example goes untested by accident. Fences of other languages (output, text) are
not run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"sh", "bash", "shell"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<name>continue|skip|fixture|shrink)\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")
FLOWDIFF_PREFIXES = ("flowdiff", ".venv/bin/flowdiff")


@dataclass
class Block:
    """One fenced code block: where it starts (the line of its first code line, 1-based)."""

    path: Path
    line: int
    lang: str
    code: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{path}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the markers of the comment lines just above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        markers: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (marker := MARKER.match(lines[j])):
            name, arg = marker["name"], (marker["arg"] or "").strip()
            if name in markers:
                raise ValueError(f"{path.name}:{j + 1}: marker {name!r} given twice for one block")
            if name in ("skip", "fixture", "shrink") and not arg:
                raise ValueError(f"{path.name}:{j + 1}: <!-- {name}: ... --> needs its argument (a reason, "
                                 f"fixture names or arguments)")
            markers[name] = arg
            j -= 1
        body: list[str] = []
        k = i + 1
        while k < len(lines) and not (lines[k].strip().startswith(fence[0] * len(fence))
                                      and lines[k].strip().strip(fence[0]) == ""):
            body.append(lines[k][indent:] if lines[k][:indent].strip() == "" else lines[k])
            k += 1
        if k == len(lines):
            raise ValueError(f"{path.name}:{i + 1}: code fence never closed")
        blocks.append(Block(path, i + 2, match["lang"].lower(), "\n".join(body) + "\n", markers))
        i = k + 1
    return blocks


@dataclass
class Chain:
    """A python block that starts afresh, with the blocks that continue from it."""

    blocks: list[Block]

    @property
    def where(self) -> str:
        return self.blocks[0].where


def python_chains(path: Path) -> list[Chain]:
    chains: list[Chain] = []
    previous: Block | None = None
    for block in extract_blocks(path):
        if block.lang not in PYTHON_LANGS:
            continue
        if "shrink" in block.markers:
            raise ValueError(f"{block.where}: <!-- shrink --> is for sh blocks")
        if "continue" in block.markers:
            if previous is None or "skip" in previous.markers:
                raise ValueError(f"{block.where}: <!-- continue --> but the previous python block "
                                 f"{'is skipped' if previous else 'does not exist'}")
            if "skip" in block.markers:
                raise ValueError(f"{block.where}: a skipped block cannot continue (drop one marker)")
            chains[-1].blocks.append(block)
        else:
            chains.append(Chain([block]))
        previous = block
    return chains


def shell_blocks(path: Path) -> list[Block]:
    blocks = [b for b in extract_blocks(path) if b.lang in SHELL_LANGS]
    for block in blocks:
        if "continue" in block.markers:
            raise ValueError(f"{block.where}: <!-- continue --> is for python blocks")
    return blocks


def shell_commands(block: Block) -> list[list[str]]:
    """The ``flowdiff`` command lines of an sh block as argument lists (without the program name)."""
    text = block.code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for offset, raw in enumerate(text.splitlines()):
        words = shlex.split(raw, comments=True)
        if not words or words[0] == "make":
            continue
        if words[0] not in FLOWDIFF_PREFIXES:
            raise ValueError(f"{block.where}+{offset}: {raw.strip()!r} is neither a flowdiff nor a make "
                             f"command; mark the block <!-- skip: reason --> if it cannot run in a test")
        commands.append(words[1:] + shlex.split(block.markers.get("shrink", "")))
    return commands


# ---------------------------------------------------------------------------------------------- fixtures


def _fixture_ddpm_pipeline(directory: Path) -> None:
    """A tiny random class-free DDPM pipeline (UNet2DModel 1×8×8 + DDPMScheduler) at path/to/ddpm-pipeline."""
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False))
    pipeline.save_pretrained(directory / "path" / "to" / "ddpm-pipeline")


def _fixture_pngs(directory: Path) -> None:
    """Two held-out digits as 8×8 grey PNGs, a.png and b.png."""
    import numpy as np
    from PIL import Image

    import flowdiff

    images = flowdiff.digits_data("test").images[:2]
    for name, image in zip(("a.png", "b.png"), images):
        pixels = ((image[0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(directory / name)


def _fixture_flux_pipeline(directory: Path) -> None:
    """A tiny random FluxPipeline (flowdiff.models.tiny_pipelines.flux) at path/to/flux, and a 16×16 RGB photo.png."""
    import numpy as np
    from PIL import Image

    from flowdiff.models import tiny_pipelines

    tiny_pipelines.flux(directory / "path" / "to")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "photo.png")


def _fixture_digits_folder(directory: Path) -> None:
    """Six held-out digits as 8×8 grey PNGs in a folder tree: digits/0/*.png, digits/1/*.png, digits/*.png."""
    import numpy as np
    from PIL import Image

    import flowdiff

    for i, image in enumerate(flowdiff.digits_data("test").images[:6]):
        path = directory / "digits" / ("", "0", "1")[i % 3] / f"d{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((image[0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8), mode="L").save(path)


FIXTURES = {"ddpm-pipeline": _fixture_ddpm_pipeline, "pngs": _fixture_pngs, "flux-pipeline": _fixture_flux_pipeline,
            "digits-folder": _fixture_digits_folder}


def make_fixtures(block: Block, directory: Path) -> None:
    for name in (n.strip() for n in block.markers.get("fixture", "").split(",") if n.strip()):
        if name not in FIXTURES:
            raise ValueError(f"{block.where}: unknown fixture {name!r}; known: {', '.join(sorted(FIXTURES))}")
        FIXTURES[name](directory)


# ------------------------------------------------------------------------------------------------- tests


def _all_python_chains() -> list[Chain]:
    return [chain for path in DOCUMENTS for chain in python_chains(path)]


def _all_shell_blocks() -> list[Block]:
    return [block for path in DOCUMENTS for block in shell_blocks(path)]


def _params(items):
    params = []
    for item in items:
        first = item.blocks[0] if isinstance(item, Chain) else item
        marks = [pytest.mark.skip(reason=f"{first.where}: {first.markers['skip']}")] if "skip" in first.markers else []
        params.append(pytest.param(item, id=item.where, marks=marks))
    return params


def test_readme_has_examples_of_both_kinds():
    """The collection below is not silently empty (a fence regex that stopped matching would pass)."""
    chains = python_chains(ROOT / "README.md")
    assert sum(len(c.blocks) for c in chains) >= 10
    assert sum(len(shell_commands(b)) for b in shell_blocks(ROOT / "README.md") if "skip" not in b.markers) >= 4


@pytest.mark.parametrize("chain", _params(_all_python_chains()))
def test_python_example(chain: Chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in chain.blocks:
        make_fixtures(block, tmp_path)
        # Pad with blank lines so that a traceback names the markdown file and its own line number.
        code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
        before = set(namespace)
        exec(code, namespace)  # noqa: S102  (the documented example is the test)
        for name in sorted(set(namespace) - before):  # a test the example defines is run, as pytest would
            if name.startswith("test_") and callable(namespace[name]):
                namespace[name]()


@pytest.mark.parametrize("block", _params(_all_shell_blocks()))
def test_shell_example(block: Block, tmp_path):
    commands = shell_commands(block)
    if not commands:
        pytest.skip(f"{block.where}: only make commands (make test is what runs this test)")
    make_fixtures(block, tmp_path)
    # One process for the block's lines (the import of torch is most of a small command's time), each
    # line through the same entry point as the installed `flowdiff` script; the first non-zero status stops.
    runner = ("import sys\nfrom flowdiff.cli import main\n"
              "for argv in eval(sys.argv[1]):\n"
              "    print('$ flowdiff', *argv, flush=True)\n"
              "    status = main(argv)\n"
              "    if status:\n"
              "        raise SystemExit(f'exit status {status}: flowdiff {\" \".join(argv)}')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", runner, repr(commands)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{block.where}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


# ---------------------------------------------------------------------------------------- the parser itself


def test_parser_markers_and_continuation(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n\n```python\nx = 1\n```\n\n<!-- continue -->\n```python\nassert x == 1\n```\n"
                   "<!-- skip: needs a GPU -->\n```python\nraise SystemExit\n```\n"
                   "<!-- shrink: --nfe 5 -->\n<!-- fixture: pngs -->\n```sh\nmake setup\nflowdiff compare  # run\n"
                   "flowdiff encode a.png \\\n  --steps 3\n```\n````text\n```python\nnot code\n```\n````\n")
    blocks = extract_blocks(doc)
    assert [(b.lang, b.line) for b in blocks] == [("python", 4), ("python", 9), ("python", 13), ("sh", 18),
                                                 ("text", 24)]
    chains = python_chains(doc)
    assert [[b.line for b in c.blocks] for c in chains] == [[4, 9], [13]]
    assert chains[1].blocks[0].markers == {"skip": "needs a GPU"}
    assert blocks[3].markers == {"shrink": "--nfe 5", "fixture": "pngs"}
    assert shell_commands(blocks[3]) == [["compare", "--nfe", "5"], ["encode", "a.png", "--steps", "3", "--nfe", "5"]]


@pytest.mark.parametrize("text, message", [
    ("<!-- skip -->\n```python\npass\n```\n", "needs its argument"),
    ("<!-- continue -->\n```python\npass\n```\n", "does not exist"),
    ("```python\npass\n", "never closed"),
    ("```sh\npip install flowdiff\n```\n", "neither a flowdiff nor a make command"),
])
def test_parser_rejects_unmarked_problems(tmp_path, text, message):
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    with pytest.raises(ValueError, match=message):
        python_chains(doc)
        for block in shell_blocks(doc):
            shell_commands(block)


# ------------------------------------------------------------------------------------------- the site


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken reference, a missing page or an undocumented name fails."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]'); the site build is not checked")
    proc = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    site = tmp_path / "site"
    for page in ("index", "guide", "which-solver", "examples", "architecture"):
        assert (site / ("index.html" if page == "index" else f"{page}/index.html")).is_file(), page
    for package in ("flowdiff", "solvers"):  # every exported name has its entry in the reference
        html = (site / "api" / package / "index.html").read_text(encoding="utf-8")
        names = [name for name, _ in _hooks().exported_names(package)]
        assert len(names) > 20
        missing = [n for n in names if f'id="{package}.{n}"' not in html]
        assert not missing, f"{package}: no API entry for {missing}"
    assert "Benchmark results" in (site / "which-solver" / "index.html").read_text(encoding="utf-8")


def _hooks():
    """docs/hooks.py, which reads `__all__` for the API pages."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
