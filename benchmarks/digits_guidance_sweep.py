"""The trainer's digits metric on a finished run's EMA weights at other guidance scales or
sampler settings (same seeds and sample count as the trainer's end-of-run evaluation).

    python benchmarks/digits_guidance_sweep.py RUN_DIR 1.3,1.4,1.5 [SAMPLER] [STEPS]

Prints one JSON line per scale: SVC and MLP class accuracy, held-out FD ratio.
"""
import json
import sys

from dits.checkpoint import load_model
from dits.evaluate.digits import digits_metric, svc_accuracy
from dits.sample import generate


def main(run: str, scales: str, sampler: str = "dpm++", steps: str = "20") -> None:
    model, info = load_model(run)
    for s in (float(x) for x in scales.split(",")):
        # seed and batch as dits.train.outputs.preview uses for its evaluation
        imgs, labs = generate(model, 1000, seed=10_000, batch_size=500, sampler=sampler, steps=int(steps),
                              cfg_scale=s)
        m = digits_metric(imgs, labs)
        print(json.dumps({"run": run, "step": info.get("step"), "cfg": s, "sampler": sampler, "steps": int(steps),
                          "svc": round(svc_accuracy(imgs, labs), 4), "acc": round(float(m["accuracy"]), 4),
                          "fd_ratio": round(float(m["fd_heldout"] / m["fd_heldout_floor"]), 3)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
