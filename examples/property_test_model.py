"""Property-test your own model's invertibility with hypothesis: round trips over drawn grids, step counts, batches.

Two properties that should hold for *any* ε-network, checked on cases hypothesis draws (and shrinks
to the smallest failing one when a property breaks):

1. reversible Heun (Kidger et al. 2021) decodes its own encode exactly — to float64 rounding
   with a float64 network, and bit for bit for float32 images (its state is kept in float64 on the
   grid 2⁻⁴⁰ℤ) — for every grid, step count, batch and guidance scale;
2. plain DDIM inversion (Euler both ways, Song et al. 2021) is not exact, but its round-trip error
   falls as steps grow: 4× the steps give a smaller error (the fitted order is reported; on a
   trained network at 3–24 steps it is well below Euler's asymptotic 1).

Replace ``my_flow()`` with your model (any ``model(x_t, t, **kwargs)`` wrapped in
``flowdiff.ProbabilityFlow``, or ``flowdiff.from_diffusers(directory)``) and ``my_images()`` with
images of yours. Run it as a script (writes ``property_report.md``) or with pytest:

    python examples/property_test_model.py --examples 50
    pytest examples/property_test_model.py
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowdiff
from flowdiff.tools import testing as ft


def my_flow(dtype: torch.dtype = torch.float32) -> flowdiff.ProbabilityFlow:
    """Your model as a ProbabilityFlow; here the shipped class-conditional digits network."""
    flow = flowdiff.pretrained("digits")
    flow.model.to(dtype)
    return flow


def my_images() -> torch.Tensor:
    """Images of yours in the model's [−1, 1] scale; here 16 held-out digits, float32, (16, 1, 8, 8)."""
    return flowdiff.digits_data("test").images[:16]


FLOW64, FLOW32, IMAGES = my_flow(torch.float64), my_flow(torch.float32), my_images()
WORST: dict[str, float] = {}   # property -> worst error seen, for the report


def _record(name: str, value: float) -> None:
    WORST[name] = max(WORST.get(name, 0.0), value)


# A batch: 1 to 3 of the images, picked by hypothesis (shrinks to the one image that fails).
batches = st.lists(st.integers(0, len(IMAGES) - 1), min_size=1, max_size=3, unique=True).map(lambda i: IMAGES[i])
guidance = st.sampled_from([None, 1.0, 3.0])   # unguided, or classifier-free guidance w (labels drawn below)


def _guided(flow: flowdiff.ProbabilityFlow, w: float | None) -> flowdiff.ProbabilityFlow:
    return flow if w is None else flowdiff.classifier_free_guidance(flow, w)


@given(images=batches, steps=ft.step_counts(1, 20), grid=ft.grid_names(), w=guidance, label=st.integers(0, 9))
def test_reversible_heun_is_exact_in_float64(images, steps, grid, w, label):
    kwargs = {} if w is None else {"model_kwargs": {"class_labels": torch.full((len(images),), label)}}
    rt = ft.assert_round_trip(_guided(FLOW64, w), images.double(), atol=1e-10,
                              solver="reversible_heun", steps=steps, grid=grid, **kwargs)
    _record("reversible_heun, float64: max abs error of decode(encode(x))", rt.max_abs)


@given(images=batches, steps=ft.step_counts(1, 20), grid=ft.grid_names())
def test_reversible_heun_is_bit_exact_in_float32(images, steps, grid):
    rt = ft.assert_round_trip(FLOW32, images, atol=0.0, solver="reversible_heun", steps=steps,
                              grid=grid)
    assert rt.decoded.x.dtype == torch.float32
    _record("reversible_heun, float32: max abs error of decode(encode(x))", rt.max_abs)


@given(images=batches, start=st.integers(3, 6))
def test_ddim_round_trip_error_falls_with_steps(images, start):
    order, errors = ft.round_trip_order(FLOW64, images.double(), [start, 2 * start, 4 * start], solver="euler")
    assert errors[-1] < errors[0], f"DDIM round-trip error does not fall with steps: errors {errors}"
    _record("DDIM (euler): round-trip error at the fewest steps", errors[0])
    WORST["DDIM (euler): smallest fitted order (error ∝ steps^−p)"] = min(
        WORST.get("DDIM (euler): smallest fitted order (error ∝ steps^−p)", float("inf")), order)


PROPERTIES = [test_reversible_heun_is_exact_in_float64, test_reversible_heun_is_bit_exact_in_float32,
              test_ddim_round_trip_error_falls_with_steps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=25, help="hypothesis examples per property (default: 25)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("FLOWDIFF_OUT", "out")),
                        help="output folder (default: $FLOWDIFF_OUT or ./out)")
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples must be at least 1, got {args.examples}")
    lines = ["| property | examples | result |", "|---|---:|---|"]
    failed = 0
    for prop in PROPERTIES:
        try:
            settings(max_examples=args.examples, deadline=None, database=None)(prop)()
            lines.append(f"| {prop.__name__} | {args.examples} | passed |")
        except AssertionError as err:  # hypothesis re-raises the shrunk failure with its case
            failed += 1
            lines.append(f"| {prop.__name__} | {args.examples} | **failed**: {str(err).splitlines()[0]} |")
    lines += ["", "| measured over the examples | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.3g} |" for name, value in WORST.items()]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "property_report.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"wrote {args.out / 'property_report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
