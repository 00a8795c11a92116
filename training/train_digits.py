"""Train the shipped digits model: ``python training/train_digits.py`` (about 10 minutes on one CPU core).

A class-conditional ε-network (:class:`flowdiff.models.nets.DigitsNet`) on the training split of
scikit-learn's 8×8 digits (:func:`flowdiff.models.pretrained.digits_data`), with the DDPM loss
‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t, c)‖² (Ho et al. 2020) at integer t uniform in [0, T),
DDPM's linear schedule (T = 1000), and the label replaced by the null class with
probability ``--label-dropout`` (Ho & Salimans, "Classifier-Free Diffusion Guidance") so
one network is both the conditional and the unconditional model. The shipped weights are
an exponential moving average of the iterates.

Seeded and single-threaded, so a rerun on the same torch build reproduces the weights.
Writes ``<out>/digits.safetensors`` and ``<out>/digits.json`` (architecture, schedule,
training record and the weights' SHA-256, which the loader checks).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowdiff.engine.schedules import Schedule
from flowdiff.models.nets import DigitsNet
from flowdiff.models.pretrained import SPLIT_SEED, TEST_FRACTION, digits_data

SCHEDULE = {"beta_schedule": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.15)
    p.add_argument("--channels", type=int, nargs=2, default=(24, 48))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "flowdiff" / "weights")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data = digits_data("train")
    x0_all, y_all = data.images, data.labels
    n = x0_all.shape[0]
    schedule = Schedule.from_config(**SCHEDULE)
    acp = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    T = schedule.num_train_timesteps

    net = DigitsNet(args.channels)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 200

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 5% of the peak
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    n_params = sum(q.numel() for q in net.parameters())
    print(f"DigitsNet{tuple(args.channels)}: {n_params} parameters, {n} training images, {args.steps} steps")
    start = time.perf_counter()
    running = None
    for step in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        x0, y = x0_all[idx], y_all[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.label_dropout] = net.null_class
        t = torch.randint(0, T, (args.batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(net(x_t, t.float(), y), eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.perf_counter() - start:6.0f} s", flush=True)
    wall = time.perf_counter() - start

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(weights))
    config = {
        "architecture": "flowdiff.models.nets.DigitsNet",
        "net": ema.config,
        "schedule": SCHEDULE,
        "prediction_type": "epsilon",
        "data": {"source": "sklearn.datasets.load_digits", "split": "train", "test_fraction": TEST_FRACTION,
                 "split_seed": SPLIT_SEED, "scaling": "x / 8 - 1 (pixel values 0-16 to [-1, 1])",
                 "shape": [1, 8, 8], "num_train_images": n},
        "training": {"script": "training/train_digits.py", "steps": args.steps, "batch": args.batch,
                     "lr": args.lr, "ema": args.ema, "label_dropout": args.label_dropout, "seed": args.seed,
                     "final_loss_ema": round(running, 5), "wall_seconds": round(wall, 1),
                     "parameters": n_params, "torch": torch.__version__, "threads": 1},
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (args.out / "digits.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {weights} and digits.json in {wall:.0f} s")


if __name__ == "__main__":
    main()
