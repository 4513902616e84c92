"""Turn pytest-benchmark JSON into one table per op: median time, throughput, % of the H100 floor, peak
memory, and the speedup of every row over every other provider measured in the same run.

    python -m benchmarks.report benchmarks/results/cpu_logprob.json [more.json ...] [--out FILE] [--targets]

Rows are grouped by (op, shape, dtype, mode). Columns:
    median      pytest-benchmark's median wall time of one call (CUDA runs synchronize inside the timed call)
    throughput  GB/s when the benchmark records bytes_moved, TFLOP/s when it records useful flops
    % floor     floor_s / median, floor_s being the kernels.md §4 roofline time on an H100 (CUDA runs only;
                on CPU the floor is not meaningful and the ratios between providers are what to read)
    peak extra  peak memory beyond the inputs during one call (see benchmarks/_memory.py), and its ratio to
                the `naive` provider of the same group
    ×<p>        median(p) / median(this row): > 1 means this row is faster than provider p
The header names the machine, software versions and load, from the JSON's machine_info.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

_BASELINE = "naive"


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def header(data: dict) -> list[str]:
    info = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    load = info.get("load_average")
    lines = [
        f"device: {info.get('device') or info.get('cpu', {}).get('brand_raw', '?')}"
        f"  |  cpu: {info.get('cpu_model', info.get('cpu', {}).get('brand_raw', '?'))}"
        f"  |  torch {info.get('torch', '?')}  |  triton {info.get('triton', '?')}"
        f"  |  cuda {info.get('cuda')}",
        f"python {info.get('python_version', '?')}  |  torch threads {info.get('torch_threads', '?')}"
        f"  |  load average at start {load}  |  run {data.get('datetime', '?')}"
        f"  |  commit {str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}",
    ]
    return lines


def rows_of(data: dict) -> list[dict]:
    rows = []
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info", {})
        params = bench.get("params") or {}
        rows.append({
            "op": extra.get("op", bench.get("group") or bench["name"].split("[")[0]),
            "provider": extra.get("provider", params.get("provider", bench["name"])),
            "mode": extra.get("mode", params.get("mode", "-")),
            "shape": extra.get("shape", "-"),
            "dtype": extra.get("dtype", "-"),
            "device": extra.get("device", "-"),
            "median": bench["stats"]["median"],
            "rounds": bench["stats"]["rounds"],
            "bytes": extra.get("bytes_moved"),
            "flops": extra.get("flops"),
            "floor_s": extra.get("floor_s"),
            "peak": extra.get("peak_extra_bytes"),
        })
    return rows


def table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["device"], r["shape"], r["dtype"], r["mode"])].append(r)
    out = []
    for op in sorted({k[0] for k in groups}):
        keys = [k for k in groups if k[0] == op]
        providers = sorted({r["provider"] for k in keys for r in groups[k]})
        cols = ["mode", "provider", "median ms", "throughput", "% floor", "peak extra", "mem/naive", "rounds"]
        cols += [f"×{p}" for p in providers]
        out.append(f"\n### {op} ({keys[0][1]}, {keys[0][2]}, {keys[0][3]})\n")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
        mode_order = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
        for key in sorted(keys, key=lambda k: (k[2], mode_order.get(k[4], 9), k[4])):
            group = sorted(groups[key], key=lambda r: r["median"])
            by_provider = {r["provider"]: r for r in group}
            base_peak = by_provider.get(_BASELINE, {}).get("peak")
            for r in group:
                if r["flops"]:
                    throughput = f"{r['flops'] / r['median'] / 1e12:.2f} TFLOP/s"
                elif r["bytes"]:
                    throughput = f"{r['bytes'] / r['median'] / 1e9:.1f} GB/s"
                else:
                    throughput = "-"
                floor = f"{100 * r['floor_s'] / r['median']:.0f}%" if r["floor_s"] else "-"
                mem_ratio = f"{r['peak'] / base_peak:.2f}" if r["peak"] is not None and base_peak else "-"
                cells = [r["mode"], r["provider"], _fmt_ms(r["median"]), throughput, floor,
                         _fmt_bytes(r["peak"]), mem_ratio, str(r["rounds"])]
                for p in providers:
                    other = by_provider.get(p)
                    same = other is None or p == r["provider"]
                    cells.append("-" if same else f"{other['median'] / r['median']:.2f}")
                out.append("| " + " | ".join(cells) + " |")
    return out


def _find(rows, op, mode, provider):
    return next((r for r in rows if r["op"] == op and r["mode"] == mode and r["provider"] == provider), None)


def targets(rows: list[dict]) -> list[str]:
    """PASS / FAIL / n/a for the issue's targets (fwd+bwd, `npo` against the baselines of the same run)."""
    out = ["", "### targets (fwd+bwd)"]

    def check(name: str, ok: bool | None, value) -> None:
        detail = value if isinstance(value, str) else ("not measured" if value is None else f"{value:.3g}")
        out.append(f"- {'n/a ' if ok is None else ('PASS' if ok else 'FAIL')}  {name}: {detail}")

    def ratio(a, b, key):
        return None if a is None or b is None or a.get(key) is None or not b.get(key) else a[key] / b[key]

    sel = {p: _find(rows, "selective_logprob", "fwd+bwd", p) for p in ("npo", "naive", "liger_grpo")}
    fl = {p: _find(rows, "fused_linear_logprob", "fwd+bwd", p) for p in ("npo", "naive", "liger_flgrpo")}
    gpu = any(r["device"] == "cuda" for r in rows)
    if not gpu:
        mem = ratio(sel["npo"], sel["naive"], "peak")
        check("selective_logprob peak ≤ 0.4 × naive", None if mem is None else mem <= 0.4, mem)
        speed = ratio(sel["naive"], sel["npo"], "median")
        check("selective_logprob ≥ 1.5× faster than naive", None if speed is None else speed >= 1.5, speed)
        mem = ratio(fl["npo"], fl["naive"], "peak")
        check("fused_linear_logprob peak ≤ 1/4 × naive", None if mem is None else mem <= 0.25, mem)
        speed = ratio(fl["naive"], fl["npo"], "median")
        check("fused_linear_logprob no slower than naive", None if speed is None else speed >= 1.0, speed)
        return out
    npo = sel["npo"]
    check("selective_logprob ≤ 5.3 ms", None if npo is None else npo["median"] <= 5.3e-3,
          None if npo is None else f"{npo['median'] * 1e3:.2f} ms")
    frac = None if npo is None or not npo["floor_s"] else npo["floor_s"] / npo["median"]
    check("selective_logprob ≥ 85 % of HBM bandwidth (3S floor)",
          None if frac is None else frac >= 0.85, frac)
    speed = ratio(sel["liger_grpo"], npo, "median")
    check("selective_logprob ≥ 1.3× Liger Triton GRPO", None if speed is None else speed >= 1.3, speed)
    npo = fl["npo"]
    speed = ratio(fl["liger_flgrpo"], npo, "median")
    check("fused_linear_logprob ≥ 1.5× LigerFusedLinearGRPOLoss",
          None if speed is None else speed >= 1.5, speed)
    mem = ratio(npo, fl["liger_flgrpo"], "peak")
    check("fused_linear_logprob peak ≤ Liger's", None if mem is None else mem <= 1.0, mem)
    tflops = None if npo is None or not npo["flops"] else npo["flops"] / npo["median"] / 1e12
    check("fused_linear_logprob ≥ 600 TFLOP/s-equivalent (6NHV useful)",
          None if tflops is None else tflops >= 600, tflops)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--targets", action="store_true",
                        help="check the selective_logprob / fused_linear_logprob targets of the issue")
    args = parser.parse_args(argv)
    lines: list[str] = []
    all_rows: list[dict] = []
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        lines.append(f"## {path}")
        lines += header(data)
        all_rows += rows_of(data)
        lines += table(rows_of(data))
        lines.append("")
    if args.targets:
        lines += targets(all_rows)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
