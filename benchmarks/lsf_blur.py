"""Time and accuracy of the fast LSF blur against the direct reference convolution.

The model blurs each trunk basis function once per instrument grid, so the realistic workload is
a (n_basis, n_grid) array on a grid uniform in u = ln(lambda): 128 basis functions x 20,000
points (a GALAH CCD at its 4e-6 trunk step spans ~17,000). This script blurs such an array with
``gaussian_blur_uniform`` (torch, float32 and float64) and with ``convolve_direct`` (numpy float64,
explicit windowed sum) and prints both timings and their ratio side by side, with the largest
difference relative to the largest value.

    python benchmarks/lsf_blur.py [--n-grid 20000] [--n-basis 128] [--sigma-pixels 3.8 30 200] [--json]

sigma 3.8 px is GALAH's R = 28,000 on a 4e-6 grid (conv1d path); 200 px is a broad LSF (FFT path).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from stellarfield.eval.speed import best_seconds
from stellarfield.physics.lsf import FFT_MIN_TAPS, convolve_direct, gaussian_blur_uniform, gaussian_kernel


def basis_like(n_basis: int, n_grid: int, seed: int = 0) -> np.ndarray:
    """Fourier-feature-like rows: sines from the broad SED scale (1 cycle per grid) to a few pixels."""
    rng = np.random.default_rng(seed)
    x = np.arange(n_grid) / n_grid
    cycles = np.geomspace(1.0, n_grid / 4.0, n_basis)
    return np.sin(2 * np.pi * cycles[:, None] * x[None, :] + rng.uniform(0, 2 * np.pi, (n_basis, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-grid", type=int, default=20_000)
    parser.add_argument("--n-basis", type=int, default=128)
    parser.add_argument("--sigma-pixels", type=float, nargs="+", default=[3.8, 30.0, 200.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    values = basis_like(args.n_basis, args.n_grid)
    step = 4e-6
    wave = np.exp(np.log(4700.0) + step * np.arange(args.n_grid))  # uniform in u
    values64 = torch.from_numpy(values)
    values32 = values64.float()

    rows = []
    for sigma_px in args.sigma_pixels:
        taps = gaussian_kernel(sigma_px).size
        fast32 = best_seconds(lambda: gaussian_blur_uniform(values32, sigma_px), args.repeats)
        fast64 = best_seconds(lambda: gaussian_blur_uniform(values64, sigma_px), args.repeats)
        start = time.perf_counter()
        direct = convolve_direct(wave, values, sigma_px * step)
        direct_s = time.perf_counter() - start
        scale = np.abs(direct).max()
        err32 = float(np.abs(gaussian_blur_uniform(values32, sigma_px).double().numpy() - direct).max() / scale)
        err64 = float(np.abs(gaussian_blur_uniform(values64, sigma_px).numpy() - direct).max() / scale)
        rows.append(
            {
                "sigma_pixels": sigma_px,
                "kernel_taps": taps,
                "method": "fft" if taps >= FFT_MIN_TAPS else "conv1d",
                "fast_float32_ms": 1e3 * fast32,
                "fast_float64_ms": 1e3 * fast64,
                "direct_ms": 1e3 * direct_s,
                "speedup_float32": direct_s / fast32,
                "max_rel_diff_float32": err32,
                "max_rel_diff_float64": err64,
            }
        )

    if args.json:
        print(json.dumps({"n_grid": args.n_grid, "n_basis": args.n_basis, "torch_threads": torch.get_num_threads(), "runs": rows}))
        return
    print(f"blur of {args.n_basis} x {args.n_grid} values on a uniform u grid (torch threads: {torch.get_num_threads()})")
    print(f"{'sigma px':>8} {'taps':>5} {'method':>6} | {'fast f32 ms':>11} {'fast f64 ms':>11} {'direct ms':>10} {'direct/fast':>11} | {'max diff f32':>12} {'max diff f64':>12}")
    for r in rows:
        print(
            f"{r['sigma_pixels']:8.1f} {r['kernel_taps']:5d} {r['method']:>6} | {r['fast_float32_ms']:11.1f} "
            f"{r['fast_float64_ms']:11.1f} {r['direct_ms']:10.1f} {r['speedup_float32']:10.1f}x | "
            f"{r['max_rel_diff_float32']:12.1e} {r['max_rel_diff_float64']:12.1e}"
        )
    print("max diff = max |fast - direct| / max |direct|; the float64 difference is the fast kernel's 4-sigma cut.")


if __name__ == "__main__":
    main()
