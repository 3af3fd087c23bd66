#!/usr/bin/env python3
"""PyTorch eager reference for `tapelora bench`: the same models, batches and steps.

Run by hand or by benchmarks/run.sh (never by CI); needs `pip install torch transformers`.

    python benchmarks/pytorch_reference.py --config gpt2 --mode lora --rank 8

Prints a few readable lines, then (last line) the same JSON keys as `tapelora bench --json`:
  full / lora : {"ms_per_step", "tokens_per_sec", "peak_rss_mib", "mfu"}
  generate    : {"tokens_per_sec", "peak_rss_mib"}
  infer       : {"base_ms", "unmerged_ms", "merged_ms", "unmerged_overhead", "merged_overhead"}
  gemm        : {"threads", "shapes": [{"m", "k", "n", "median_gflops", "best_gflops"}, …]}

The models: a GPT-2 block stack written the way nanoGPT writes it (pre-LN, fused c_attn,
tanh-GELU, F.scaled_dot_product_attention with is_causal, lm_head tied to wte), with biases for
`gpt2` and none for `nanogpt-cpu`, exactly tapelora's presets. LoRA is a plain module on the q
and v slices of c_attn (A random, B zero, α = 2r), the base frozen (requires_grad=False), AdamW
over the trainable parameters only — what PEFT does, without PEFT's wrapping overhead.
Generation uses transformers' GPT2LMHeadModel.generate (greedy, KV cache) on a randomly
initialised GPT-2 of the same size, as users would.
"""

import argparse
import json
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    # name: (n_layer, n_head, n_embd, n_positions, vocab, bias, batch, block, steps)
    "nanogpt-cpu": (4, 4, 128, 64, 65, False, 12, 64, 20),
    "gpt2": (12, 12, 768, 1024, 50257, True, 4, 256, 3),
}


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LoraQV(nn.Module):
    """c_attn plus s·B(Ax) on its q and v thirds."""

    def __init__(self, base, n_embd, r, alpha):
        super().__init__()
        self.base, self.c, self.s = base, n_embd, alpha / r
        self.a_q = nn.Parameter(torch.empty(r, n_embd))
        self.b_q = nn.Parameter(torch.zeros(n_embd, r))
        self.a_v = nn.Parameter(torch.empty(r, n_embd))
        self.b_v = nn.Parameter(torch.zeros(n_embd, r))
        nn.init.kaiming_uniform_(self.a_q, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.a_v, a=math.sqrt(5))
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        dq = (x @ self.a_q.t()) @ self.b_q.t() * self.s
        dv = (x @ self.a_v.t()) @ self.b_v.t() * self.s
        zero = torch.zeros_like(dq)
        return y + torch.cat([dq, zero, dv], dim=-1)

    @torch.no_grad()
    def merge(self):
        c = self.c
        self.base.weight[:c] += self.s * self.b_q @ self.a_q
        self.base.weight[2 * c :] += self.s * self.b_v @ self.a_v
        self.merged = True


class Block(nn.Module):
    def __init__(self, c, h, bias):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(c, bias=bias)
        self.c_attn = nn.Linear(c, 3 * c, bias=bias)
        self.c_proj = nn.Linear(c, c, bias=bias)
        self.ln_2 = nn.LayerNorm(c, bias=bias)
        self.c_fc = nn.Linear(c, 4 * c, bias=bias)
        self.mlp_proj = nn.Linear(4 * c, c, bias=bias)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, n_positions, vocab, bias):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, targets=None):
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def model_flops_per_step(model, batch, block, lora):
    """Matmul FLOPs of one training step, counted as tapelora's GEMM counter counts them."""
    n_layer, c = len(model.h), model.ln_f.normalized_shape[0]
    vocab, tokens = model.wte.weight.shape[0], batch * block
    per_token_fwd = n_layer * (2 * c * 3 * c + 2 * c * c + 2 * 2 * c * 4 * c) + 2 * c * vocab
    attn_fwd = n_layer * 2 * 2 * batch * block * block * c  # QKᵀ and AV, full (not halved)
    fwd = per_token_fwd * tokens + attn_fwd
    # Backward: input grads always (2× the weight matmuls for full, 1× for frozen) + attention.
    return fwd * 3 if not lora else fwd * 2


def measured_peak_flops():
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[1]


def build(args):
    n_layer, n_head, n_embd, n_pos, vocab, bias, batch, block, steps = PRESETS[args.config]
    if args.embd:
        n_embd, n_head = args.embd, max(1, args.embd // 64)
    if args.layers:
        n_layer = args.layers
    batch, block, steps = args.batch or batch, args.block or block, args.steps or steps
    torch.manual_seed(0)
    model = Gpt(n_layer, n_head, n_embd, n_pos, vocab, bias)
    ids = torch.tensor([[(i * 131 + j * 31) % vocab for j in range(block)] for i in range(batch)])
    targets = (ids * 7 + 1) % vocab
    return model, ids, targets, batch, block, steps


def add_lora(model, r):
    for block in model.h:
        block.c_attn = LoraQV(block.c_attn, model.ln_f.normalized_shape[0], r, 2 * r)


def train(args, lora):
    model, ids, targets, batch, block, steps = build(args)
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(model, args.rank)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    best = float("inf")  # the quickest step: the speed when the shared machine left us alone
    for _ in range(steps):
        step_start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - step_start)
    secs = (time.perf_counter() - start) / steps
    flops = model_flops_per_step(model, batch, block, lora)
    peak = measured_peak_flops()
    tokens = batch * block
    ms, tps, mfu, rss = secs * 1e3, tokens / secs, flops / secs / peak, peak_rss_mib()
    name = f"LoRA r={args.rank} (q,v)" if lora else "full"
    print(f"PyTorch {torch.__version__} {args.config} {name} step (batch {batch} × block {block}, "
          f"{sum(p.numel() for p in params)} trainable, {torch.get_num_threads()} threads):")
    print(f"  {ms:.1f} ms/step (quickest {best * 1e3:.1f}), {tps:.0f} tokens/s, MFU {100 * mfu:.1f}%, peak RSS {rss:.0f} MiB")
    print(json.dumps({"ms_per_step": round(ms, 3), "best_ms_per_step": round(best * 1e3, 3),
                      "tokens_per_sec": round(tps, 1), "peak_rss_mib": round(rss, 1), "mfu": round(mfu, 4)}))


def generate(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd, n_pos, vocab, _, _, _, _ = PRESETS[args.config]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_pos,
                     vocab_size=vocab)
    model = GPT2LMHeadModel(cfg).eval()
    prompt = torch.tensor([[(i * 37) % vocab for i in range(16)]])
    new = min(128, n_pos - 16)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
              pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, **kw)  # warm-up
        start = time.perf_counter()
        out = model.generate(prompt, **kw)
        secs = time.perf_counter() - start
    tps = (out.shape[1] - 16) / secs
    print(f"transformers {args.config} generation: batch 1, 16-token prompt, {new} new tokens, "
          f"greedy, KV cache: {tps:.1f} tokens/s")
    print(json.dumps({"tokens_per_sec": round(tps, 2), "peak_rss_mib": round(peak_rss_mib(), 1)}))


def infer(args):
    base, ids, _, batch, block, steps = build(args)
    for p in base.parameters():
        p.requires_grad_(False)
    import copy

    unmerged = copy.deepcopy(base)
    add_lora(unmerged, args.rank)
    for blk in unmerged.h:
        nn.init.normal_(blk.c_attn.b_q, std=0.02)
        nn.init.normal_(blk.c_attn.b_v, std=0.02)
    merged = copy.deepcopy(unmerged)
    for blk in merged.h:
        blk.c_attn.merge()

    def seconds(m):
        with torch.no_grad():
            start = time.perf_counter()
            m(ids)
            return time.perf_counter() - start

    # As tapelora's bench: one forward of each model in turn; the quickest of each, and the
    # overheads as medians of the per-round ratios against base.
    for m in (base, unmerged, merged):
        seconds(m)  # warm-up
    times = [(seconds(base), seconds(unmerged), seconds(merged)) for _ in range(max(3 * steps, 9))]
    b, u, g = (min(t[i] for t in times) for i in range(3))
    ru, rg = (sorted(t[i] / t[0] for t in times)[len(times) // 2] for i in (1, 2))
    print(f"PyTorch {args.config} forward, batch {batch} × block {block}: quickest base "
          f"{b * 1e3:.2f} ms, unmerged {u * 1e3:.2f} ms, merged {g * 1e3:.2f} ms; median "
          f"overhead unmerged {100 * (ru - 1):+.1f}%, merged {100 * (rg - 1):+.1f}%")
    print(json.dumps({"base_ms": round(b * 1e3, 3), "unmerged_ms": round(u * 1e3, 3),
                      "merged_ms": round(g * 1e3, 3), "unmerged_overhead": round(ru - 1, 4),
                      "merged_overhead": round(rg - 1, 4)}))


GPT2_LINEAR_SHAPES = "1024x768x2304,1024x768x768,1024x768x3072,1024x3072x768"


def gemm(args):
    """torch.mm alone on each M×K×N shape (row-major operands, C written into a preallocated
    tensor): the median and best of --reps calls after a warm-up, as `tapelora bench --mode gemm`."""
    rows = []
    for shape in args.shapes.split(","):
        m, k, n = (int(d) for d in shape.replace("×", "x").split("x"))
        gen = torch.Generator().manual_seed(0)
        a, b, c = torch.rand(m, k, generator=gen) - 0.5, torch.rand(k, n, generator=gen) - 0.5, torch.empty(m, n)
        torch.mm(a, b, out=c)
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - start)
        times.sort()
        flops = 2.0 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "median_gflops": round(flops / times[len(times) // 2] / 1e9, 2),
                     "best_gflops": round(flops / times[0] / 1e9, 2)})
        print(f"torch.mm {m}×{k}×{n}: median {rows[-1]['median_gflops']} GFLOP/s, best {rows[-1]['best_gflops']}")
    print(json.dumps({"threads": torch.get_num_threads(), "shapes": rows}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(PRESETS), default="nanogpt-cpu")
    p.add_argument("--mode", choices=["full", "lora", "generate", "infer", "gemm"], default="full")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int)
    p.add_argument("--block", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--embd", type=int, help="override the width (heads = width / 64)")
    p.add_argument("--layers", type=int)
    p.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    p.add_argument("--shapes", default=GPT2_LINEAR_SHAPES, help="M×K×N,… for --mode gemm")
    p.add_argument("--reps", type=int, default=7, help="timed calls per shape for --mode gemm")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"full": lambda: train(args, False), "lora": lambda: train(args, True),
     "generate": lambda: generate(args), "infer": lambda: infer(args),
     "gemm": lambda: gemm(args)}[args.mode]()


if __name__ == "__main__":
    main()
