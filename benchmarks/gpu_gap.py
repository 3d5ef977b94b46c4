"""Where does CUDA's max_memory_allocated exceed the profile? Per phase, real CUDA step:
max_memory_allocated vs PyTorch's MemTracker (tensor storages seen at dispatch) vs the
fake-CPU profile's interval peaks.

    python benchmarks/gpu_gap.py
"""

import torch
from torch.distributed._tools.mem_tracker import MemTracker

import memtune
from memtune import zoo
from memtune.batching import loss_from_output, split_batch

MiB = 2**20


def run(name, make, batch, precision, backend=None):
    torch.manual_seed(0)
    model = make().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args, kwargs, target = split_batch(batch, None)
    from contextlib import nullcontext
    from torch.nn.attention import sdpa_kernel

    ctx = (lambda: sdpa_kernel(backend)) if backend else nullcontext

    def step(marks):
        torch.cuda.reset_peak_memory_stats()
        with ctx(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(*args, **kwargs)
            loss = loss_from_output(out, batch, target, None)
        del out
        torch.cuda.synchronize(); marks["fwd"] = torch.cuda.max_memory_allocated(); torch.cuda.reset_peak_memory_stats()
        with ctx():
            loss.backward()
        torch.cuda.synchronize(); marks["bwd"] = torch.cuda.max_memory_allocated(); torch.cuda.reset_peak_memory_stats()
        opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); marks["opt"] = torch.cuda.max_memory_allocated()

    for _ in range(2):
        step({})
    marks = {}
    step(marks)
    mt = MemTracker()
    mt.track_external(model, opt, *[t for t in (batch.values() if isinstance(batch, dict) else batch)])
    with mt:
        step({})
    tracked = mt.get_tracker_snapshot("peak")[torch.device("cuda", 0)]["Total"]
    prof = memtune.profile(model, batch, precision=precision, target=torch.device("cuda"))
    ev = prof.timeline
    li = next(i for i, e in enumerate(ev) if e.name == "loss")
    oi = next(i for i, e in enumerate(ev) if e.name == "optim_start")
    p_fwd = max(e.peak_bytes for e in ev[:li + 1])
    p_bwd = max(e.peak_bytes for e in ev[li:oi])
    p_opt = ev[oi].peak_bytes
    print(f"{name:10s} {precision:10s} {(backend.name if backend else ''):20s} real fwd/bwd/opt {marks['fwd'] / MiB:8.1f} {marks['bwd'] / MiB:8.1f} "
          f"{marks['opt'] / MiB:8.1f} | MemTracker {tracked / MiB:8.1f} | profile {p_fwd / MiB:8.1f} {p_bwd / MiB:8.1f} {p_opt / MiB:8.1f}",
          flush=True)


CASES = ["gpt-fp32", "gpt-bf16", "gpt-bf16-flash", "gpt-bf16-efficient", "llama-fp32", "llama-bf16"]


def run_case(case: str) -> None:
    from torch.nn.attention import SDPBackend

    T = 1024
    ids = torch.randint(0, 256, (8, T), device="cuda")
    gpt = lambda: zoo.GPT(zoo.GPTConfig(n_layer=4, n_embd=1024, n_head=16, block_size=T))  # noqa: E731
    ids2 = torch.randint(0, 32000, (4, T), device="cuda")
    llama = lambda: zoo.hf_llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,  # noqa: E731
                                 vocab_size=32000, max_position_embeddings=T)
    model, prec, *backend = case.split("-")
    make, batch = (gpt, (ids, ids)) if model == "gpt" else (llama, {"input_ids": ids2, "labels": ids2})
    b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(backend[0]) if backend else None
    run(model, make, batch, "bf16-mixed" if prec == "bf16" else "fp32", b)


def main():
    """Each case in a fresh process, so no case sees memory another one left behind."""
    import subprocess
    import sys

    if len(sys.argv) > 1:
        run_case(sys.argv[1])
        return
    for case in CASES:
        subprocess.run([sys.executable, __file__, case], check=True)


if __name__ == "__main__":
    main()
