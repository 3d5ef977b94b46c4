"""Which allocations are live at the CUDA peak, by allocation site, against what the
profile (and MemTracker, which sees the same tensors) accounts for.

Uses the caching allocator's own history (torch.cuda.memory._record_memory_history):
replays alloc/free events to the moment of the highest allocated total and groups the live
blocks by their innermost interesting stack frame.

    python benchmarks/gpu_peak_sites.py
"""

import sys
from collections import Counter
from pathlib import Path

import torch

from memtune import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_validation import train_step  # noqa: E402

MiB = 2**20


def site(frames):
    names = [f.get("name", "") for f in frames]
    keep = [n for n in names if any(k in n for k in ("cudnn", "cublas", "Cublas", "flash", "efficient", "mem_eff",
                                                     "workspace", "Workspace", "sdpa", "attention", "Attention"))]
    if keep:
        return keep[0][:90]
    py = [f"{f.get('filename', '').split('/')[-1]}:{f.get('line')}:{f.get('name')}" for f in frames if f.get("filename", "").endswith(".py")]
    return (py[0] if py else (names[0] if names else "?"))[:90]


def run(name, make, batch, precision):
    torch.manual_seed(0)
    model = make().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        train_step(model, batch, None, precision, opt)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="all")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for e in snap["device_traces"][0] if e["action"] in ("alloc", "free_requested", "free_completed")]
    live, cur, peak, at_peak = {}, 0, 0, None
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
        if cur > peak:
            peak, at_peak = cur, dict(live)
    by = Counter()
    for e in at_peak.values():
        by[site(e.get("frames", []))] += e["size"]
    print(f"== {name} {precision}: peak of allocations made during the step {peak / MiB:.1f} MiB "
          f"(+ {torch.cuda.memory_allocated() / MiB:.1f} MiB live before it)")
    for s, b in by.most_common(14):
        print(f"   {b / MiB:9.2f} MiB  {s}")


def main():
    T = 1024
    ids = torch.randint(0, 256, (8, T), device="cuda")
    gpt = lambda: zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=1024, n_head=16, block_size=T))  # noqa: E731
    run("gpt", gpt, (ids, ids), "bf16-mixed")
    ids2 = torch.randint(0, 32000, (4, T), device="cuda")
    llama = lambda: zoo.hf_llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,  # noqa: E731
                                 vocab_size=32000, max_position_embeddings=T)
    run("llama", llama, {"input_ids": ids2, "labels": ids2}, "fp32")


if __name__ == "__main__":
    main()
