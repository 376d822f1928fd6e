"""The digits-text check on a finished run at several guidance scales (and samplers/steps).

    python benchmarks/digits_text_sweep.py RUN_DIR 1.3,2,3 [--per-prompt 50] [--sampler dpm++] [--steps 20]

Prints, per scale, the prompted-class accuracy of each phrasing and the bold/thin ink ratio per
class (dits.text.digits), and writes them as JSON lines to RUN_DIR/text_sweep.jsonl.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("scales")
    ap.add_argument("--per-prompt", type=int, default=50)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    from dits.checkpoint import load_model
    from dits.text.digits import digits_text_report, format_report

    model, info = load_model(args.run)
    tc = info.get("train_config") or {}
    for s in (float(v) for v in args.scales.split(",")):
        t0 = time.time()
        r = digits_text_report(model, per_prompt=args.per_prompt, seed=(args.seed if args.seed is not None
                                                                        else tc.get("seed", 0) + 10_000),
                               sampler=args.sampler or tc.get("sampler", "dpm++"),
                               steps=args.steps or tc.get("sample_steps", 20), cfg_scale=s)
        print(f"cfg {s:g}: {format_report(r)} | ratio per class "
              f"{' '.join(f'{x:.2f}' for x in r['ink']['ratio'])} ({time.time() - t0:.0f} s)", flush=True)
        with open(Path(args.run) / "text_sweep.jsonl", "a") as f:
            f.write(json.dumps({"cfg_scale": s, "step": info.get("step"), **r}, default=float) + "\n")


if __name__ == "__main__":
    main()
