"""The command line on a class-conditional diffusers model (DiT): refused up front, naming what it needs.

Before, ``flowdiff sample`` on a DiT folder stopped at step 0 inside the network (``embedding(): argument
'indices' ... must be Tensor, not NoneType``): the command line passes no class labels.
"""

from __future__ import annotations

from flowdiff.cli import main
from flowdiff.models import tiny_pipelines


def test_dit_folder_is_refused_before_sampling(tmp_path, capsys):
    _, folder = tiny_pipelines.dit(tmp_path)
    code = main(["sample", "--model", str(folder), "--steps", "2", "--num", "1", "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code != 0
    assert "class-conditional DiTTransformer2DModel" in err and "class labels" in err and "class_labels" in err
    assert "embedding()" not in err and not (tmp_path / "out.png").exists()

