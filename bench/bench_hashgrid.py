"""Benchmark: the pack's pure-torch hash grid vs nerfstudio's pure-torch ``HashEncoding``.

Both use the default Instant-NGP grid (16 levels x 2 features, 2^19 entries per
level, base resolution 16, growth 1.4472692, finest level 4096; nerfstudio's
``min_res=16, max_res=4096`` gives the same growth) and run on the SAME random
points in [0, 1]^3, CPU, float32, in the same process. Geometry differs in the
details (ours follows tinycudann: dense tables for the 5 coarse levels, vertices
at half-cell offsets; nerfstudio hashes every level), so outputs are not compared.

Times are the median of several calls after a warm-up call (``bench/timing.py``):
"forward" under ``torch.no_grad()`` (inference; ours chunks by ``chunk_size``),
"forward+backward" a training step's encoding part (``.sum().backward()`` into
the table). Peak memory is the growth of the resident set size during the first
(cold) call in a fresh child process, sampled every millisecond by a thread.

nerfstudio is NOT a dependency of the pack. To include it, put its package and
the few modules its ``field_components.encodings`` imports somewhere OUTSIDE
the project environment, without touching torch:

    pip install --target /tmp/nsdeps --no-deps nerfstudio==1.1.5 jaxtyping wadler_lindig \
        viser msgspec websockets zstandard
    PYTHONPATH=/tmp/nsdeps python bench/bench_hashgrid.py

Run: ``python bench/bench_hashgrid.py`` (about two minutes with nerfstudio).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # allow running from anywhere without installing the pack
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from mpod_core.encoding import HashGridConfig, HashGridEncoding  # noqa: E402
from timing import median_time, peak_rss_growth_kib  # noqa: E402  (bench/ is sys.path[0] when run as a script)

SIZES = (1 << 16, 1 << 18)
REPEATS = 5
NERFSTUDIO_HINT = ("nerfstudio not importable; for the comparison run:\n"
                   "  pip install --target /tmp/nsdeps --no-deps nerfstudio==1.1.5 jaxtyping wadler_lindig "
                   "viser msgspec websockets zstandard\n"
                   "  PYTHONPATH=/tmp/nsdeps python bench/bench_hashgrid.py")


def make(impl: str) -> torch.nn.Module:
    cfg = HashGridConfig()
    if impl == "ours":
        return HashGridEncoding(cfg, backend="torch")
    from nerfstudio.field_components.encodings import HashEncoding  # noqa: PLC0415 (optional peer)

    finest = cfg.base_resolution * cfg.per_level_scale ** (cfg.n_levels - 1)
    return HashEncoding(num_levels=cfg.n_levels, min_res=cfg.base_resolution, max_res=round(finest),
                        log2_hashmap_size=cfg.log2_hashmap_size, features_per_level=cfg.n_features_per_level,
                        hash_init_scale=1e-4, implementation="torch")


def operations(enc: torch.nn.Module, x: torch.Tensor):
    def forward():
        with torch.no_grad():
            enc(x)

    def forward_backward():
        enc.zero_grad(set_to_none=True)
        enc(x).sum().backward()

    return {"forward": forward, "forward+backward": forward_backward}


def points(n: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(0))


def child(impl: str, n: int, op: str) -> None:
    """Run one operation cold in a fresh process; print its peak RSS growth (KiB)."""
    enc = make(impl)
    fn = operations(enc, points(n))[op]
    print(json.dumps({"peak_rss_growth_kib": peak_rss_growth_kib(fn)}))


def peak_memory_mib(impl: str, n: int, op: str) -> float:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", impl, str(n), op],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_growth_kib"] / 1024.0


def main() -> None:
    warnings.simplefilter("ignore", RuntimeWarning)
    impls = ["ours"]
    try:
        make("nerfstudio")
        impls.append("nerfstudio")
    except ImportError as exc:
        print(f"{NERFSTUDIO_HINT}\n  ({exc})")
    cfg = HashGridConfig()
    print(f"grid: {cfg.n_levels} levels x {cfg.n_features_per_level} features, 2^{cfg.log2_hashmap_size} "
          f"entries, base {cfg.base_resolution}, growth {cfg.per_level_scale}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    rows = []
    for n in SIZES:
        x = points(n)
        for impl in impls:
            torch.manual_seed(0)
            enc = make(impl)
            for op, fn in operations(enc, x).items():
                t = median_time(fn, REPEATS)
                rows.append((impl, n, op, t, peak_memory_mib(impl, n, op)))
    print()
    print(f"{'implementation':14s} {'points':>8s} {'operation':18s} {'time/call':>12s} "
          f"{'Mpoints/s':>10s} {'peak mem':>12s}")
    print("-" * 80)
    for impl, n, op, t, mem in rows:
        print(f"{impl:14s} {n:8d} {op:18s} {t * 1e3:9.1f} ms {n / t / 1e6:10.2f} {mem:8.1f} MiB")
    print(f"(time: median of {REPEATS} calls after a warm-up; peak mem: RSS growth of a cold call "
          "in a fresh process, sampled at 1 kHz)")
    if "nerfstudio" in impls:
        print()
        for n in SIZES:
            for op in ("forward", "forward+backward"):
                t = {r[0]: r[3] for r in rows if r[1] == n and r[2] == op}
                print(f"speed-up ours vs nerfstudio, {n} points, {op}: {t['nerfstudio'] / t['ours']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
