"""What a model's fingerprint costs beside the encode that computes it.

``encode`` digests the flow once (its latent records the fingerprint), ``decode`` once (to check the latent),
``compare`` twice. This times :func:`flowdiff.flow_fingerprint` — the first call on a model and a repeated one — for
the model kinds it reads differently, next to one ``encode`` of a batch on the same model at ``--steps`` steps:

* a network given as the model (``torch.nn.Module``: its state, digested once and cached by the module's version);
* the same network closed over by a plain function (the function's code, closure and the globals it names are read,
  the network through the same cache);
* a plain function closed over a large plain tensor (hashed on every call: no cache for plain tensors).

The network is a stack of linear layers of ``--params`` parameters in all acting on 64-dim states (a closed-form
model's cost would be nothing to compare with). Usage: ``python benchmarks/bench_fingerprint.py [--params 10000000]
[--batch 16] [--steps 10] [--repeats 5]``; one thread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import flowdiff


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of ``repeats`` further calls) in seconds."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    rest = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rest.append(time.perf_counter() - start)
    return first, statistics.median(rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000, help="parameters of the network, about")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dim, width = 64, 1024
    layers = max(1, round(args.params / (width * width)))
    net = torch.nn.Sequential(torch.nn.Linear(dim + 1, width), torch.nn.SiLU(),
                              *[m for _ in range(layers) for m in (torch.nn.Linear(width, width), torch.nn.SiLU())],
                              torch.nn.Linear(width, dim)).double()
    with torch.no_grad():  # a small ε: a random network's full-size output sends the encode off its bound
        net[-1].weight.mul_(1e-3)
        net[-1].bias.zero_()
    n_params = sum(p.numel() for p in net.parameters())
    schedule = flowdiff.Schedule.linear()

    class Eps(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = (t.reshape(-1, 1).to(x.dtype) / 1000).expand(x.shape[0], 1)
            return self.net(torch.cat([x, tt], dim=1))

    module = Eps(net)

    def closure_over_network(x, t):
        return module(x, t)

    big = torch.randn(n_params, dtype=torch.float64)

    def closure_over_tensor(x, t):
        return 0.1 * x + 0 * big[:1]  # reads the tensor; a small ε

    flows = {"network as the model (nn.Module)": flowdiff.ProbabilityFlow(module, schedule),
             "plain function closing over the network": flowdiff.ProbabilityFlow(closure_over_network, schedule),
             "plain function closing over a plain tensor": flowdiff.ProbabilityFlow(closure_over_tensor, schedule)}
    images = torch.randn(args.batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5
    print(f"## Fingerprint cost beside an encode (`bench_fingerprint.py --params {args.params} --batch {args.batch} "
          f"--steps {args.steps} --repeats {args.repeats}`)\n")
    print(f"{platform.machine()}, torch {torch.__version__}, 1 thread, float64; the network: {n_params:,} parameters "
          f"({layers + 2} linear layers), the plain tensor {n_params:,} values.\n")
    print("| model | fingerprint, first call | fingerprint, again (median) | one encode (its one fingerprint "
          f"included), {args.steps} steps, batch {args.batch} (median) | fingerprint again / encode |")
    print("|---|---:|---:|---:|---:|")
    for name, flow in flows.items():
        first, again = _timed(lambda flow=flow: flowdiff.flow_fingerprint(flow), args.repeats)
        with torch.no_grad():
            _, encode = _timed(lambda flow=flow: flowdiff.encode(flow, images, steps=args.steps), args.repeats)
        print(f"| {name} | {first * 1e3:.1f} ms | {again * 1e3:.2f} ms | {encode * 1e3:.1f} ms | "
              f"{again / encode:.3f} |")


if __name__ == "__main__":
    main()
