"""How close the weight-only int4/int8 decode matmuls are to this machine's memory bandwidth, and which
kernel wins at M = 1..64 rows (decode of M sequences together); where llmkit's C kernels run, also its
decode attention against torch's SDPA.

    PYTHONPATH=. python benchmarks/matmul_bandwidth.py [--threads 2] [--rounds 20]

Shapes: SmolLM2-135M's fused linears (qkv 960x576, o 576x576, gate/up 3072x576, down 576x1536) and
the int8 head (49152x576). Bandwidth reference: a torch copy of a 256 MiB fp32 tensor (read + write
bytes / time). Achieved GB/s of a kernel = bytes of its quantized weight (codes + scales) / time at
M = 1 (the activations are a few KB). Prints a markdown table; best of --rounds interleaved rounds.

"int4"/"int8" are what llmkit's QuantLinear runs on this CPU: torch's kernels, or llmkit's own C loops
(llmkit/quant/native.py) on x86 CPUs with AVX2 and no AVX-512 (whose int4 record switches to the fp32
dequantization + GEMM above methods.NATIVE_INT4_MAX_ROWS rows); "torch int4"/"torch int8" are torch's
kernels called directly on their own packing, so where llmkit uses its own both are timed in one run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from llmkit.quant import QuantLinear, native
from llmkit.quant.methods import DENSE, GROUP, _int4_codes

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}


def best(fn, rounds: int) -> float:
    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def torch_kernel(q: QuantLinear):
    """x (M, K) -> torch's own int4/int8 weight-only kernel on q's weight (its packing, bf16 activations)."""
    st = q.storage()
    if q.method.name == "int8":
        return lambda x: torch._weight_int8pack_mm(x.to(torch.bfloat16), st["qweight"], st["scales"])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_int4_codes(st["qweight"]).to(torch.int32), 1)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, st["scales"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    t = best(lambda: dst.copy_(src), max(5, args.rounds // 4))
    copy_gbs = 2 * src.numel() * 4 / t / 1e9
    print(f"copy bandwidth (256 MiB fp32, read+write): {copy_gbs:.1f} GB/s, {args.threads} threads")
    print(f"llmkit's int4/int8 layers run {'llmkit C kernels (AVX2)' if native.available() else 'torch kernels'}")

    print("\n| weight | method | bytes MiB | M=1 us | GB/s | of copy bw |")
    print("|---|---|---:|---:|---:|---:|")
    mods = {}
    for name, (N, K) in SHAPES.items():
        lin = torch.nn.Linear(K, N, bias=False)
        for method in (["int8"] if name == "head" else ["int4", "int8"]):
            q = QuantLinear.from_linear(lin, method)
            mods[(name, method)] = q
            nbytes = sum(t.numel() * t.element_size() for t in q.tensors().values())
            x = torch.randn(1, K)
            with torch.inference_mode():
                s = best(lambda: q(x), args.rounds)
            gbs = nbytes / s / 1e9
            print(f"| {name} {N}x{K} | {method} | {nbytes / 2**20:.2f} | {s * 1e6:.0f} | {gbs:.1f} | {gbs / copy_gbs:.0%} |")

    # the decode case: every layer's matrices once (30 distinct weights each, 63 MiB of int4 codes), so the
    # weights come from memory, not from the cache as the single-matrix rows above may
    print("\nAll 30 SmolLM2 layers' (qkv, o, gate_up, down) once, M = 1 (what one decode step reads):")
    print("| method | MiB read | ms | GB/s | of copy bw |")
    print("|---|---:|---:|---:|---:|")
    layer = ["qkv", "o", "gate_up", "down"]
    for method in ("int4", "int8"):
        qs = [QuantLinear.from_linear(torch.nn.Linear(SHAPES[n][1], SHAPES[n][0], bias=False), method)
              for _ in range(30) for n in layer]
        nbytes = sum(t.numel() * t.element_size() for q in qs for t in q.tensors().values())
        xb = {K: torch.randn(1, K) for K in (576, 1536)}
        ref = [torch_kernel(q) for q in qs] if native.available() else []
        with torch.inference_mode():
            s = best(lambda: [q.method.matmul(xb[q.in_features], q.tensors(), q.out_features) for q in qs],
                     max(5, args.rounds // 2))
            sr = best(lambda: [f(xb[q.in_features]) for f, q in zip(ref, qs)], max(5, args.rounds // 2)) if ref else 0
        gbs = nbytes / s / 1e9
        print(f"| {method} | {nbytes / 2**20:.1f} | {s * 1e3:.2f} | {gbs:.1f} | {gbs / copy_gbs:.0%} |")
        if ref:
            gbs = nbytes / sr / 1e9
            print(f"| torch {method} | {nbytes / 2**20:.1f} | {sr * 1e3:.2f} | {gbs:.1f} | {gbs / copy_gbs:.0%} |")
        del qs, ref

    rows = [int(r) for r in args.rows.split(",")]
    print("\nAll layer matrices of one SmolLM2 block (qkv, o, gate_up, down) once, ms per block, by rows M:")
    dt = str(DENSE).removeprefix("torch.")
    print(f"| M | int4 (QuantLinear's path) | int8 kernel | torch int4 | torch int8 | bf16 GEMM (kept copy) "
          f"| int4 dequantize + {dt} GEMM | fp32 GEMM (kept copy) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = {(n, m): torch_kernel(mods[(n, m)]) for n in layer for m in ("int4", "int8")}
    dense = {n: mods[(n, "int4")].dequantize(torch.bfloat16) for n in layer}
    dense32 = {n: mods[(n, "int4")].dequantize(torch.float32) for n in layer}
    for M in rows:
        xs = {n: torch.randn(M, SHAPES[n][1]) for n in layer}
        xb = {n: x.to(torch.bfloat16) for n, x in xs.items()}
        with torch.inference_mode():
            def kern(method):
                for n in layer:
                    q = mods[(n, method)]
                    q.method.matmul(xs[n], q.tensors(), q.out_features)
            r4 = best(lambda: kern("int4"), args.rounds)
            r8 = best(lambda: kern("int8"), args.rounds)
            t4 = best(lambda: [ref[(n, "int4")](xs[n]) for n in layer], args.rounds)
            t8 = best(lambda: [ref[(n, "int8")](xs[n]) for n in layer], args.rounds)
            rb = best(lambda: [F.linear(xb[n], dense[n]) for n in layer], args.rounds)
            rd = best(lambda: [F.linear(xs[n].to(DENSE), mods[(n, "int4")].dequantize(DENSE)) for n in layer],
                      max(3, args.rounds // 4))
            rf = best(lambda: [F.linear(xs[n], dense32[n]) for n in layer], args.rounds)
        print(f"| {M} | {r4 * 1e3:.3f} | {r8 * 1e3:.3f} | {t4 * 1e3:.3f} | {t8 * 1e3:.3f} | {rb * 1e3:.3f} | {rd * 1e3:.3f} "
              f"| {rf * 1e3:.3f} |")

    if native.available():
        # an eager decode step's attention (models/modules.py sdpa): one query per row over a cache's slots
        print("\nDecode attention of one SmolLM2 layer (9 query heads, 3 K/V heads, D 64; fp32 cache slices of 512"
              " slots), us per call, by rows M and slots read S:")
        print("| M | S | llmkit C kernel | torch SDPA (flash) | torch / llmkit |")
        print("|---:|---:|---:|---:|---:|")
        for M in rows:
            for S in (128, 384):
                q = torch.randn(M, 9, 1, 64)
                cache = torch.randn(2, M, 3, 512, 64)
                k, v = cache[0, :, :, :S], cache[1, :, :, :S]
                with torch.inference_mode():
                    tn = best(lambda: native.attn_decode(q, k, v, None, None), args.rounds)
                    tt = best(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.rounds)
                print(f"| {M} | {S} | {tn * 1e6:.0f} | {tt * 1e6:.0f} | {tt / tn:.2f} |")


if __name__ == "__main__":
    main()
