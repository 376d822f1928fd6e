"""The trainer's digits metric on a finished run's EMA weights at other guidance scales, guidance
intervals or sampler settings (1,000 samples, as the trainer's end-of-run evaluation).

    python benchmarks/digits_guidance_sweep.py RUN_DIR 1.3,1.5 [--intervals none,0.1:0.7]
        [--sampler heun] [--steps 10] [--seed S] [--ckpt STEP]

``--seed`` is the first sampling seed (sample i uses seed S + i); the default is the trainer's own
(its run seed + 10,000). Choose settings on other seeds than the ones you report. Prints one JSON
line per (scale, interval): SVC and MLP class accuracy, held-out FD ratio.
"""
import argparse
import json

from dits.checkpoint import load_model
from dits.evaluate.digits import digits_metric, svc_accuracy
from dits.sample import generate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("scales")
    p.add_argument("--intervals", default="none", help="comma list of LO:HI or none")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ckpt", default=None, help="checkpoint step (default: the latest)")
    a = p.parse_args()
    where = f"{a.run}/checkpoints/{int(a.ckpt):07d}.pt" if a.ckpt else a.run
    model, info = load_model(where)
    tc = info.get("train_config") or {}
    sampler = a.sampler or tc.get("sampler", "heun")
    steps = a.steps or int(tc.get("sample_steps", 10))
    seed = a.seed if a.seed is not None else int(tc.get("seed", 0)) + 10_000
    for s in (float(x) for x in a.scales.split(",")):
        for iv in a.intervals.split(","):
            interval = None if iv == "none" else tuple(float(v) for v in iv.split(":"))
            # batch as dits.train.outputs.preview uses for its evaluation
            imgs, labs = generate(model, 1000, seed=seed, batch_size=500, sampler=sampler, steps=steps,
                                  cfg_scale=s, objective=tc.get("objective", "diffusion"),
                                  guidance_interval=interval)
            m = digits_metric(imgs, labs)
            print(json.dumps({"run": a.run, "step": info.get("step"), "cfg": s, "interval": iv, "seed": seed,
                              "sampler": sampler, "steps": steps, "svc": round(svc_accuracy(imgs, labs), 4),
                              "acc": round(float(m["accuracy"]), 4),
                              "fd_ratio": round(float(m["fd_heldout"] / m["fd_heldout_floor"]), 3)}), flush=True)


if __name__ == "__main__":
    main()
