"""torch.compile for a trainable trunk: compile time, step time, and the run length where it pays.

Each variant trains the whole model (preprocessing + trunk + a 10-class head, every weight
trainable) through transferkit's training step (``train_one_epoch`` with a ``SpeedConfig``)
on a synthetic uint8 batch, in its own process with an empty inductor cache (the compile a
user's first run pays). ``eager``: one warm-up step, then ``--steps`` timed steps.
``compiled``: the first step is timed alone (compilation + one step), then ``--steps``
timed steps. From the two:

    break-even images = (first compiled step - one eager step) / (1 / eager img/s - 1 / compiled img/s)

a run that trains on more images than that (epochs x training images) is faster compiled.
The numbers differ by trunk (faster compiled for some, slower for others), so
``compile="auto"`` does not apply a rule per device type: it times a run's own steps
(`transferkit.train.compile_trial`), and the compile times recorded in ``docs/benchmarks.md``
give its estimate of the compilation (`transferkit.train.engines.compile_estimate`,
``engine="train"``).

With ``--trial``, a third variant per trunk runs ``compile="auto"``'s trial
(`transferkit.train.compile_trial.CompileTrial`, made to try whatever the run length) on the
same batches and prints its verdict beside the table's numbers.

    python benchmarks/compile_training.py                              # lite0 and resnet18, fp32, 224 px, batch 32
    python benchmarks/compile_training.py --trial                      # with compile="auto"'s verdict
    python benchmarks/compile_training.py --precision bf16 --only resnet18
    python benchmarks/compile_training.py --device cuda --steps 30     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"lite0": "timm:tf_efficientnet_lite0", "resnet18": "tv:resnet18"}


class _Batches:
    """A loader-like list of the same batch (``train_one_epoch`` only iterates it)."""

    def __init__(self, x, y, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps
        self.sampler = range(steps * len(y))

    def __iter__(self):
        return iter([(self.x, self.y)] * self.steps)


def child(args) -> dict:
    import torch

    import transferkit as tk
    from transferkit.train.loop import Loop, train_one_epoch
    from transferkit.train.speed import SpeedConfig

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    bb = tk.get_backbone(MODELS[args.only[0]], weights=None)
    model = tk.build_model(bb, 10, spec=bb.input_spec.replace(image_size=args.image_size)).to(dev)
    compiled = args.child == "compiled"
    speed = SpeedConfig.make(dev, precision=args.precision, channels_last=True, compile=compiled)
    speed.prepare(model)
    runner = speed.maybe_compile(model)
    trial = None
    if args.child == "trial":  # compile="auto"'s trial, made to try: its verdict on these steps
        from transferkit.train.compile_trial import TIMED_STEPS, WARMUP_STEPS, CompileTrial

        trial = CompileTrial(steps_left=10**9, estimate_s=0.0)
        runner = trial.wrap(model)
    x = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loop = Loop(optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), set_mode=lambda e: model.train(), speed=speed,
                scaler=speed.grad_scaler(), verbose=False)

    def run(steps: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_one_epoch(runner, _Batches(x, y, steps), loop, verbose=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if trial is not None:
        run(2 * (WARMUP_STEPS + TIMED_STEPS) + 2)
        return {"variant": "trial", **trial.finish()}
    first = run(1)  # eager: warm-up; compiled: compilation of forward and backward + one step
    if compiled:
        run(1)  # a second step may recompile once (e.g. the optimizer state appears)
    s = run(args.steps)
    return {"variant": args.child, "first_step_s": first, "step_s": s / args.steps,
            "images_per_s": args.batch * args.steps / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--trial", action="store_true", help="also run compile='auto''s trial and print its verdict")
    ap.add_argument("--child", choices=("eager", "compiled", "trial"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _machine import machine_line, run_child

    print(f"# torch.compile, trainable trunk, {args.image_size} px, batch {args.batch}, {args.precision}, "
          f"channels_last, {args.steps} timed steps, device {args.device}\n# {machine_line(args.threads)}")
    print("\n| backbone | eager img/s | compiled img/s | speed-up | first compiled step s | eager step s | "
          "break-even images |" + (" trial: kept (its speed-up, compile s) |" if args.trial else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---|" if args.trial else ""))
    results = {}
    for part in args.only or ("lite0", "resnet18"):
        run = {}
        for variant in ("eager", "compiled", *(["trial"] if args.trial else [])):
            argv = ["--child", variant, "--only", part, "--batch", str(args.batch), "--image-size",
                    str(args.image_size), "--steps", str(args.steps), "--threads", str(args.threads),
                    "--precision", args.precision, "--device", args.device]
            with tempfile.TemporaryDirectory() as cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as on a user's first run
                run[variant] = run_child(__file__, argv, f"[{part}] {variant}")
        e, c = run["eager"], run["compiled"]
        gain = 1 / e["images_per_s"] - 1 / c["images_per_s"]
        extra = c["first_step_s"] - e["step_s"]
        even = f"{extra / gain:,.0f}" if gain > 0 else "never (compiled is not faster)"
        results[part] = {"eager": e, "compiled": c, "break_even_images": extra / gain if gain > 0 else None}
        t = run.get("trial")
        verdict = "" if t is None else (
            f" {t['kept']} ({t['speedup']:.2f}x, {t['compile_s']:.0f} s) |" if "speedup" in t
            else f" {t['kept']} ({t['reason']}) |")
        results[part]["trial"] = t
        print(f"| {MODELS[part]} | {e['images_per_s']:.1f} | {c['images_per_s']:.1f} | "
              f"{c['images_per_s'] / e['images_per_s']:.2f}x | {c['first_step_s']:.0f} | {e['step_s']:.2f} | "
              f"{even} |{verdict}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"compile_training_{args.device}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
