"""``dits study``: rerun the paper's scaling and block-design experiments on a built-in data set
(the glyphs testbed by default; ``--data digits`` for the 8x8 digits).

    dits study scaling [--budget quick|full] [--data glyphs|digits] [--out DIR] [--jobs N] [--print-commands] [--report-only]
    dits study blocks  [same flags]
    dits study sampling-compute [same flags]   # finding 4, on a finished scaling study's --out
    dits study backbones [same flags]          # DiT vs U-Net at matched Gflops (docs/backbones.md)
"""
from __future__ import annotations

from pathlib import Path

from dits.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("study", help="reproduce the paper's scaling / block-design findings on a built-in testbed",
                       description="Train a grid of ordinary `dits train` runs (resumable: rerun to continue), "
                                   "then write study.csv, study.md, figures and a verdict per finding. "
                                   "sampling-compute (finding 4) samples a finished scaling study's models.")
    p.add_argument("kind", help="scaling | blocks | sampling-compute | backbones (DiT vs U-Net at matched Gflops)")
    p.add_argument("--budget", default="quick", help="quick (about 20 min on 2 cores) | full (hours)")
    p.add_argument("--data", default=None, help="built-in data set: glyphs (the testbed, default) | digits; "
                                                "default for an existing --out: the data it was run on")
    p.add_argument("--out", default=None, help="study directory (default studies/<kind>-<budget>; "
                                               "sampling-compute: the scaling study's)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained in parallel (at most the CPU cores)")
    p.add_argument("--print-commands", action="store_true",
                   help="print one plain command per cell (e.g. for SLURM) and exit")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the run dirs")
    p.set_defaults(func=run)


def run(args) -> int:
    from dits.study.grid import check_budget, check_kind
    from dits.study.runner import check_jobs

    from dits.study.grid import DEFAULT_DATA, check_data
    from dits.study.runner import manifest_data, read_manifest

    kind = check_kind(args.kind)
    if args.data is not None:
        check_data(args.data)
    check_jobs(args.jobs)
    if args.print_commands and args.report_only:
        raise UserError("--print-commands and --report-only exclude each other; give one")
    scaling_kind = "scaling" if kind == "sampling-compute" else kind
    default_out = f"studies/{scaling_kind}-{args.budget}" + (f"-{args.data}" if args.data == "digits" else "")
    out = Path(args.out or default_out)
    data = args.data or manifest_data(read_manifest(out)) or DEFAULT_DATA
    check_budget(args.budget, data)
    if kind == "sampling-compute":
        return _sampling(args, out)
    if args.print_commands:
        from dits.study.runner import print_commands
        print("\n".join(print_commands(kind, args.budget, out, data)))
        return 0
    if not args.report_only:
        from dits.study.runner import run_cells
        run_cells(kind, args.budget, out, jobs=args.jobs, log=lambda s: print(s, flush=True), data=data)
    return _report(out, kind, args.budget)


def _sampling(args, out: Path) -> int:
    from dits.study import sampling

    if args.print_commands:
        print("\n".join(sampling.commands(out, args.budget)))
        return 0
    if not args.report_only:
        sampling.run_sampling(out, args.budget, jobs=args.jobs, log=lambda s: print(s, flush=True))
    return _report(out, "scaling", args.budget)


def _report(out: Path, kind: str, budget: str) -> int:
    from dits.study.report import write_report
    from dits.study.runner import read_manifest

    m = read_manifest(out)
    if m is not None and (m.get("kind"), m.get("budget")) != (kind, budget):
        raise UserError(f"--out {out} holds a {m.get('kind')} study (budget {m.get('budget')}), "
                        f"not {kind} ({budget}); give the matching kind and --budget")
    if not (out / "runs").is_dir():
        raise UserError(f"no runs under {out / 'runs'}: run the study (or its --print-commands) first")
    rep = write_report(out, kind, budget)
    failed = [r["model"] for r in rep["rows"] if r["status"].startswith("failed")]
    for v in rep["verdicts"]:
        print(f"finding {v['finding']}: {v['verdict']}: {v['text']}")
    if rep.get("claim"):  # backbones: the verdict on the paper's claim, in one line
        print(rep["claim"])
    print(f"report: {out / 'study.md'} ({len(rep['files'])} files)"
          + (f"; FAILED cells: {', '.join(failed)} (see {out / 'logs'})" if failed else ""))
    return 1 if failed else 0
