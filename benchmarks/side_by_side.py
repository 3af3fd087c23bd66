#!/usr/bin/env python3
"""Runs `tapelora bench` and benchmarks/pytorch_reference.py back to back, benchmark by
benchmark, and writes the tables (with ratios) into docs/BENCHMARKS.md between the
`<!-- side-by-side:start -->` and `<!-- side-by-side:end -->` markers. Called by run.sh.

Environment: PYTHON (an interpreter with torch + transformers), TAPELORA (the binary),
QUICK=1 (fewer benchmarks, no scaling tables), REPEAT (rounds per row, default 3: an odd
count, so that a row's per-round median is one round's ratio),
NANOGPT_ROUNDS (rounds for the nanogpt-cpu training rows: max(REPEAT, NANOGPT_ROUNDS), 7
by default).
"""

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TAPELORA = os.environ.get("TAPELORA", str(ROOT / "target/release/tapelora"))
PYTHON = os.environ.get("PYTHON", sys.executable)
QUICK = os.environ.get("QUICK") == "1"


def last_json(cmd, env=None):
    """Runs a command and returns its last line parsed as JSON."""
    print("  $", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


REPEAT = int(os.environ.get("REPEAT", "3"))


def better(a, b):
    """The faster of two runs of one side (a shared machine only ever slows a run down)."""
    key = "ms_per_step" if "ms_per_step" in a else ("tokens_per_sec" if "tokens_per_sec" in a else "base_ms")
    if key == "tokens_per_sec":
        return a if a[key] >= b[key] else b
    return a if a[key] <= b[key] else b


# Rounds for the nanogpt-cpu training rows (seconds each, so more rounds are cheap).
NANOGPT_ROUNDS = int(os.environ.get("NANOGPT_ROUNDS", "7"))


def pair(args, threads=2, rounds=None):
    """The same benchmark on both sides, alternating tapelora and PyTorch `rounds` (REPEAT)
    times and keeping each side's best run: the machine's speed drifts by up to 2× within
    minutes. The PyTorch/tapelora ms-per-step ratio of each round (two runs minutes apart at
    most) is kept too, in `ours["round_ratios"]`, for training benchmarks."""
    ours = theirs = None
    ratios = []
    for _ in range(rounds or REPEAT):
        o = last_json([TAPELORA, "bench", "--json", *args], {"RAYON_NUM_THREADS": str(threads)})
        t = last_json([PYTHON, str(ROOT / "benchmarks/pytorch_reference.py"), *args,
                       "--threads", str(threads)])
        if "ms_per_step" in o and "ms_per_step" in t:
            ratios.append(t["ms_per_step"] / o["ms_per_step"])
        ours = o if ours is None else quickest_of(better(ours, o), ours, o)
        theirs = t if theirs is None else quickest_of(better(theirs, t), theirs, t)
    return {**ours, "round_ratios": ratios}, theirs


def median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def quickest_of(kept, a, b):
    """`kept` with its quickest single step taken over both runs (training benchmarks)."""
    if "best_ms_per_step" in a and "best_ms_per_step" in b:
        kept = {**kept, "best_ms_per_step": min(a["best_ms_per_step"], b["best_ms_per_step"])}
    return kept


def fmt(v, digits=1):
    return f"{v:,.{digits}f}"


def training_rows(specs):
    rows = ["| benchmark | tapelora ms/step | PyTorch ms/step | tokens/s ratio (↑) | "
            "per-round ratios: median (range) | "
            "quickest step, tapelora / PyTorch ms | quickest-step ratio (↑) | tapelora MFU | "
            "tapelora peak RSS MiB | PyTorch peak RSS MiB | RSS ratio (↓) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    results = {}
    for label, args in specs:
        print(label, flush=True)
        rounds = max(REPEAT, NANOGPT_ROUNDS) if "nanogpt-cpu" in args else REPEAT
        ours, theirs = pair(args, rounds=rounds)
        results[label] = (ours, theirs)
        r = ours["round_ratios"]
        per_round = f"{median(r):.2f}× ({min(r):.2f}–{max(r):.2f}, {len(r)} rounds)" if r else "—"
        rows.append(
            f"| {label} | {fmt(ours['ms_per_step'])} | {fmt(theirs['ms_per_step'])} | "
            f"**{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}×** | "
            f"{per_round} | "
            f"{fmt(ours['best_ms_per_step'])} / {fmt(theirs['best_ms_per_step'])} | "
            f"**{theirs['best_ms_per_step'] / ours['best_ms_per_step']:.2f}×** | "
            f"{100 * ours['mfu']:.0f} % | {fmt(ours['peak_rss_mib'], 0)} | "
            f"{fmt(theirs['peak_rss_mib'], 0)} | {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f} |")
    return rows, results


def gemm_rows(threads, rounds=None):
    """Our GEMM and torch.mm alone on GPT-2's linear shapes on `threads` threads, the two sides
    alternated `rounds` times (each run: 20 calls per shape after a warm-up, its median kept):
    where the training rows' GEMM time goes, side by side; one thread against two separates the
    kernel's rate from how it scales."""
    rounds = rounds or max(REPEAT, NANOGPT_ROUNDS)
    args = ["--mode", "gemm", "--reps", "20"]
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(last_json([TAPELORA, "bench", "--json", *args],
                              {"RAYON_NUM_THREADS": str(threads)})["shapes"])
        theirs.append(last_json([PYTHON, str(ROOT / "benchmarks/pytorch_reference.py"), *args,
                                 "--threads", str(threads)])["shapes"])
    dims = lambda runs: [(x["m"], x["k"], x["n"]) for x in runs[0]]
    if dims(ours) != dims(theirs):
        raise SystemExit(f"gemm: the two sides timed different shapes: {dims(ours)} vs {dims(theirs)}")
    rows = [f"### GEMM alone ({'one thread' if threads == 1 else f'{threads} threads'}): "
            "GPT-2 B4×T256's linears", "",
            f"`C = A·B`, row-major operands; {rounds} alternated rounds of 20 calls per shape on "
            "each side (GFLOP/s: the median over rounds of each run's median call, and the best "
            "call of all).", "",
            "| M×K×N | tapelora GFLOP/s | torch.mm GFLOP/s | ratio: median of rounds (range) (↑) | "
            "best call, tapelora / torch.mm |",
            "|---|---:|---:|---:|---:|"]
    for i, shape in enumerate(ours[0]):
        o = [run[i]["median_gflops"] for run in ours]
        t = [run[i]["median_gflops"] for run in theirs]
        r = [a / b for a, b in zip(o, t)]
        rows.append(f"| {shape['m']}×{shape['k']}×{shape['n']} | {median(o):.0f} | {median(t):.0f} | "
                    f"**{median(r):.2f}×** ({min(r):.2f}–{max(r):.2f}) | "
                    f"{max(run[i]['best_gflops'] for run in ours):.0f} / "
                    f"{max(run[i]['best_gflops'] for run in theirs):.0f} |")
    return rows + [""]


def main():
    sections = []
    train_specs = [
        ("nanogpt-cpu full, B12×T64", ["--config", "nanogpt-cpu", "--mode", "full"]),
        ("nanogpt-cpu LoRA r=8 (q,v)", ["--config", "nanogpt-cpu", "--mode", "lora"]),
        ("GPT-2 124M full, B4×T256", ["--config", "gpt2", "--mode", "full", "--steps", "3"]),
        ("GPT-2 124M LoRA r=8 (q,v), B4×T256", ["--config", "gpt2", "--mode", "lora", "--steps", "3"]),
    ]
    if QUICK:
        train_specs = train_specs[:2]
    rows, results = training_rows(train_specs)
    sections += ["### Training steps (forward + backward + AdamW)", "", *rows, ""]
    g = [v for k, v in results.items() if k.startswith("GPT-2")]
    if len(g) == 2:
        (full, _), (lora, _) = g
        sections += [f"tapelora's GPT-2 LoRA step takes {lora['ms_per_step'] / full['ms_per_step']:.2f}× "
                     f"its full step; its peak RSS is {lora['peak_rss_mib'] / full['peak_rss_mib']:.2f}× "
                     "the full step's.", ""]

    for threads in [1, 2]:
        print("gemm", threads, flush=True)
        sections += gemm_rows(threads)

    print("generation", flush=True)
    gen_cfg = "nanogpt-cpu" if QUICK else "gpt2"
    ours, theirs = pair(["--config", gen_cfg, "--mode", "generate"])
    sections += ["### Generation (batch 1, 16-token prompt, 128 new tokens, greedy, KV cache)", "",
                 "| model | tapelora tokens/s | transformers tokens/s | ratio (↑) |",
                 "|---|---:|---:|---:|",
                 f"| {gen_cfg} | {fmt(ours['tokens_per_sec'])} | {fmt(theirs['tokens_per_sec'])} | "
                 f"**{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}×** |", ""]

    sections += ["### Forward latency: base, LoRA r=8 unmerged, merged", "",
                 "Each side runs ≥ 9 rounds of one forward per model in turn; ms are the quickest of "
                 "each, overheads the median of the per-round ratios against base.", "",
                 "| model, batch | side | base ms | unmerged ms | overhead | merged ms | overhead |",
                 "|---|---|---:|---:|---:|---:|---:|"]
    infer_specs = [("nanogpt-cpu, B12×T64", ["--config", "nanogpt-cpu", "--mode", "infer"])]
    if not QUICK:
        infer_specs.append(("GPT-2 124M, B1×T256", ["--config", "gpt2", "--mode", "infer", "--batch", "1"]))
    for label, args in infer_specs:
        print("inference", label, flush=True)
        ours, theirs = pair(args)
        for side, r in [("tapelora", ours), ("PyTorch", theirs)]:
            sections.append(
                f"| {label} | {side} | {r['base_ms']:.2f} | {r['unmerged_ms']:.2f} | "
                f"{100 * r['unmerged_overhead']:+.1f} % | {r['merged_ms']:.2f} | "
                f"{100 * r['merged_overhead']:+.1f} % |")
    sections.append("")

    if not QUICK:
        sections += ["### Scaling: block size (GPT-2 124M LoRA r=8, batch 1)", "",
                     "| block | tapelora ms/step | PyTorch ms/step | tokens/s ratio (↑) |",
                     "|---:|---:|---:|---:|"]
        for block in [64, 128, 256, 512, 1024]:
            print("block", block, flush=True)
            ours, theirs = pair(["--config", "gpt2", "--mode", "lora", "--batch", "1",
                                 "--block", str(block), "--steps", "2"])
            sections.append(f"| {block} | {fmt(ours['ms_per_step'])} | {fmt(theirs['ms_per_step'])} | "
                            f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}× |")
        sections += ["", "### Scaling: width (4 blocks, heads = width/64, vocab 50257, full step, B4×T256)", "",
                     "| width | tapelora ms/step | PyTorch ms/step | tokens/s ratio (↑) |",
                     "|---:|---:|---:|---:|"]
        for embd in [256, 512, 768, 1024]:
            print("width", embd, flush=True)
            ours, theirs = pair(["--config", "gpt2", "--mode", "full", "--layers", "4",
                                 "--embd", str(embd), "--steps", "2"])
            sections.append(f"| {embd} | {fmt(ours['ms_per_step'])} | {fmt(theirs['ms_per_step'])} | "
                            f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}× |")
        sections += ["", "### Threads: 1 vs 2", "",
                     "| benchmark | threads | tapelora ms/step | PyTorch ms/step | tokens/s ratio (↑) |",
                     "|---|---:|---:|---:|---:|"]
        for label, args in [("nanogpt-cpu full", ["--config", "nanogpt-cpu", "--mode", "full"]),
                            ("GPT-2 LoRA r=8, B1×T256", ["--config", "gpt2", "--mode", "lora",
                                                          "--batch", "1", "--steps", "2"])]:
            for threads in [1, 2]:
                print(label, threads, flush=True)
                ours, theirs = pair(args, threads)
                sections.append(f"| {label} | {threads} | {fmt(ours['ms_per_step'])} | "
                                f"{fmt(theirs['ms_per_step'])} | "
                                f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}× |")
        sections.append("")

    torch_version = subprocess.run([PYTHON, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    header = [f"Measured {datetime.date.today()} by `benchmarks/run.sh` on {platform.machine()}, "
              f"{os.cpu_count()} cores, PyTorch {torch_version}; each row alternated the two sides "
              f"{REPEAT}× ({max(REPEAT, NANOGPT_ROUNDS)}× for the nanogpt-cpu training rows) and "
              "keeps each side's best run; the per-round column is PyTorch's ms/step over "
              "tapelora's within each round. "
              "Ratios above 1 favour tapelora for tokens/s, below 1 for memory.", ""]
    doc = ROOT / "docs/BENCHMARKS.md"
    text = doc.read_text()
    start, end = "<!-- side-by-side:start -->", "<!-- side-by-side:end -->"
    body = "\n".join([start, *header, *sections, end])
    if start in text and end in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n## Side by side with PyTorch\n\n" + body + "\n"
    doc.write_text(text)
    print("\n".join(sections))


if __name__ == "__main__":
    main()
