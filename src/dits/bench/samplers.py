"""Sampler accuracy against the number of network evaluations (NFE), on data with exact ε.

With the exact denoiser (:mod:`dits.diffusion.oracle`) the only error left is the sampler's own,
so a table of distance-to-truth against NFE shows how many evaluations each sampler needs.
Every element of x₀ is an independent draw from a known 1-D distribution (a Gaussian, and a
3-mode mixture whose narrow modes behave like fine image detail), so the output is compared with
the truth by the 1-D Wasserstein distance W1 = ∫|F_n − F| (F_n the samples' CDF, F the exact
one). x_T is stratified (see :func:`stratified_normal`), which removes the sampling noise from
the deterministic samplers' numbers; DDPM's keep it: W1 of an exact iid sample of the same size
is printed as that floor.

All samplers run through :func:`dits.diffusion.sample` (float32, linear schedule, T = 1000), from
the same x_T. Used by ``dits bench samplers`` and ``benchmarks/bench_samplers.py``.
"""
from __future__ import annotations

import time

import torch

from dits.diffusion.oracle import GaussianMixtureOracle
from dits.diffusion.sampling import SAMPLERS, nfe, sample

DATASETS = {
    # Zero mean: a Gaussian's mean only adds the same small prior-mismatch offset to every
    # sampler (x_T is N(0, I), not exactly the marginal at T), a floor that would hide differences.
    "gaussian": dict(weights=[1.0], means=[0.0], stds=[0.5]),
    "mixture": dict(weights=[0.3, 0.4, 0.3], means=[-0.6, 0.05, 0.7], stds=[0.08, 0.2, 0.1]),
}
FULL_NFES = (5, 10, 15, 20, 30, 40, 50, 100, 250)
QUICK_NFES = (5, 10, 20, 50)
REFERENCE = ("ddpm", 250)  # DiT's sampler: the quality bar


def describe(spec: dict) -> str:
    parts = [f"{w:g}·N({m:g}, {s:g}²)" for w, m, s in zip(spec["weights"], spec["means"], spec["stds"])]
    return " + ".join(parts) if len(parts) > 1 else parts[0].split("·", 1)[1]


def wasserstein1(oracle: GaussianMixtureOracle, x: torch.Tensor, points: int = 4001) -> float:
    """W1 = ∫|F_n − F| between the empirical distribution of x's elements and the oracle's.

    Integrated on the sorted samples plus a uniform grid: F_n is constant between consecutive
    nodes, so only the smooth F is approximated (trapezoid), to second order in the spacing.
    """
    xs = x.detach().double().flatten().sort().values
    lo = min(xs[0].item(), oracle.mean - 8 * oracle.std)
    hi = max(xs[-1].item(), oracle.mean + 8 * oracle.std)
    nodes = torch.cat([xs, torch.linspace(lo, hi, points, dtype=torch.float64)]).sort().values
    f_n = torch.searchsorted(xs, nodes[:-1], right=True).double() / xs.numel()  # on [node_k, node_k+1)
    f = oracle.cdf(nodes)
    gap = 0.5 * ((f_n - f[:-1]).abs() + (f_n - f[1:]).abs())
    return (gap * nodes.diff()).sum().item()


def stratified_normal(shape, seed: int = 0) -> torch.Tensor:
    """x_T whose elements are the n quantiles Φ⁻¹((j + ½)/n) of N(0, 1), in random order.

    The deterministic samplers are maps x_T -> x_0, so with iid x_T their W1 would carry the
    sampling noise of x_T itself (~1/√n), hiding errors below it. With stratified x_T the exact
    ODE would return the data quantiles almost exactly (W1 ~ 1/n), so what is left is the
    sampler's own error. DDPM adds fresh noise at every step; its W1 keeps the iid floor.
    """
    n = 1
    for d in shape:
        n *= d
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    z = torch.special.ndtri(u)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return z.to(torch.float32).reshape(shape)


def steps_for(sampler: str, target_nfe: int) -> int | None:
    """Steps giving ``target_nfe`` evaluations (Heun: the even NFE at or below it)."""
    steps = target_nfe // 2 if sampler == "heun" else target_nfe
    return steps if steps >= 1 else None


def run(*, quick: bool = False, samples: int | None = None, nfes=None, datasets=("gaussian", "mixture"),
        samplers=SAMPLERS, seed: int = 0, out=print) -> dict:
    """Run the benchmark, print one table per dataset, return {dataset: {sampler: {nfe: W1}}}."""
    # Elementwise work on ~1e5 numbers gains nothing from threads, and OpenMP's spin-waiting
    # on busy shared cores can make each op 100x slower: run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(quick, samples, nfes, datasets, samplers, seed, out)
    finally:
        torch.set_num_threads(threads)


def _run(quick, samples, nfes, datasets, samplers, seed, out) -> dict:
    nfes = tuple(nfes or (QUICK_NFES if quick else FULL_NFES))
    samples = samples or (2 ** 14 if quick else 2 ** 18)
    side = 32
    shape = (max(1, samples // side ** 2), 1, side, side)
    n = shape[0] * side * side
    ref_sampler, ref_nfe = REFERENCE
    results = {}
    start = time.perf_counter()
    out(f"Sampler error against NFE: exact-ε denoiser, linear schedule, T=1000, float32, {n} samples per run.")
    out("W1 = 1-D Wasserstein distance of the samples to the true data distribution (×1e-3; lower is better).")
    for name in datasets:
        spec = DATASETS[name]
        noise = stratified_normal(shape, seed)
        floor_oracle = GaussianMixtureOracle(**spec)
        draws = [floor_oracle.sample_data((n,), torch.Generator().manual_seed(seed + 1 + k)) for k in range(4)]
        floor = sum(wasserstein1(floor_oracle, d) for d in draws) / len(draws)
        table = {}
        for sampler in samplers:
            # Only DDPM uses the variance channels; the others get the cheaper ε-only oracle.
            learn_sigma = sampler == "ddpm"
            oracle = GaussianMixtureOracle(**spec, learn_sigma=learn_sigma)
            row = {}
            wanted = set(nfes) | ({ref_nfe} if sampler == ref_sampler else set())
            for target in sorted(wanted):
                steps = steps_for(sampler, target)
                if steps is None:
                    continue
                oracle.calls = 0
                x = sample(oracle, shape, sampler=sampler, steps=steps, learn_sigma=learn_sigma, noise=noise,
                           generator=torch.Generator().manual_seed(seed + 2))
                assert oracle.calls == nfe(sampler, steps)
                row[target] = wasserstein1(oracle, x)
            table[sampler] = row
        results[name] = table
        _print_table(out, name, spec, table, sorted(set(nfes) | {ref_nfe}), floor)
    out(f"({time.perf_counter() - start:.0f} s; Heun's columns use the even NFE at or below the heading.)")
    return results


def _print_table(out, name, spec, table, columns, floor):
    out("")
    out(f"{name}: {describe(spec)}")
    out(f"  noise floor (mean W1 of exact iid samples): {floor * 1e3:.2f}; DDPM's numbers carry up to this much "
        f"sampling noise, the deterministic samplers' none")
    out(f"{'NFE':>8} " + " ".join(f"{c:>7}" for c in columns))
    for sampler, row in table.items():
        cells = [f"{row[c] * 1e3:7.2f}" if c in row else f"{'-':>7}" for c in columns]
        out(f"{sampler:>8} " + " ".join(cells))
    ref_sampler, ref_nfe = REFERENCE
    ref = table.get(ref_sampler, {}).get(ref_nfe)
    if ref is None:
        return
    if ref < 1.5 * floor:
        out(f"  note: {ref_sampler}-{ref_nfe} is within its noise floor here; more --samples resolve it better")
    for sampler, row in table.items():
        if sampler == ref_sampler:
            continue
        hit = [c for c in sorted(row) if row[c] <= ref]
        if hit:
            out(f"  {sampler} matches {ref_sampler}-{ref_nfe} (W1 {ref * 1e3:.2f}) at {hit[0]} NFE "
                f"(W1 {row[hit[0]] * 1e3:.2f}): {ref_nfe / hit[0]:.1f}x fewer evaluations")
        else:
            best = min(row, key=row.get)
            out(f"  {sampler} does not reach {ref_sampler}-{ref_nfe} (W1 {ref * 1e3:.2f}) within "
                f"{max(row)} NFE (best {row[best] * 1e3:.2f} at {best})")


def main(argv=None) -> int:
    """``benchmarks/bench_samplers.py``; the same options as ``dits bench samplers``."""
    import argparse
    p = argparse.ArgumentParser(description="Sampler error against NFE on data with exact ε.")
    p.add_argument("--quick", action="store_true", help=f"fewer samples and NFE {QUICK_NFES}")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default 2^18, quick 2^14)")
    p.add_argument("--seed", type=int, default=0, help="seed for x_T and DDPM's noise (default 0)")
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as e:   # UserError: one line, as the CLI prints it
        p.error(str(e))


def run_from_args(args) -> int:
    from dits.errors import UserError
    if args.samples is not None and args.samples < 1024:
        raise UserError(f"--samples must be at least 1024, got {args.samples}")
    run(quick=args.quick, samples=args.samples, seed=args.seed)
    return 0
