"""Where a wrapped training step spends its time: the bench_wrap GPT trained plainly and
wrapped, each phase (forward / backward / step + zero_grad) timed with a synchronisation
around it, the unsynchronised steady-state step (also with step_in_backward=True), hm.report,
and a torch.profiler table of two wrapped steps (chrome trace in $OUT or /tmp). For a GPU session:

    python3 bench/profile_wrap.py            # ~40 s on an H200 after the build

Not a benchmark (nothing is asserted or recorded); bench/NOTES.md keeps what it showed.
"""
import copy, os, sys, time, statistics
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import heteromem as hm
from heteromem.models import GPT
import bench_wrap

dev = "cuda" if torch.cuda.is_available() else "cpu"
out = os.environ.get("OUT", "/tmp")
torch.manual_seed(0)
cfg, bs = bench_wrap._config(dev)
base = GPT(cfg)
n = sum(p.numel() for p in base.parameters())
batch = torch.randint(0, cfg.vocab_size, (bs, cfg.block_size + 1), device=dev)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

def phases(model, opt, autocast, steps=8):
    rows = []
    for i in range(steps):
        sync(); t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch[:, :-1], batch[:, 1:])
        sync(); t1 = time.perf_counter()
        loss.backward(); sync(); t2 = time.perf_counter()
        opt.step(); opt.zero_grad(set_to_none=True); sync(); t3 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    rows = rows[3:]
    return [statistics.median(c) * 1e3 for c in zip(*rows)]

plain = copy.deepcopy(base).to(dev)
popt = torch.optim.AdamW(plain.parameters(), lr=1e-4, fused=dev == "cuda")
print("plain   fwd/bwd/step/total ms", ["%.1f" % x for x in phases(plain, popt, dev == "cuda")])
del plain, popt
chunk_bytes = int(max(p.numel() for p in base.parameters()) * 2 * 1.01)
budget = max(n * 2 // 3, 4 * chunk_bytes)
model, opt = hm.wrap(copy.deepcopy(base), lr=1e-4, device=dev, dtype=torch.bfloat16,
                     device_memory=budget, chunk_mb=chunk_bytes / 2**20)
print("wrapped fwd/bwd/step/total ms", ["%.1f" % x for x in phases(model, opt, False)])
print(hm.report(model))
# Unsynchronised steady state, as the bench times it.
for _ in range(2):
    model(batch[:, :-1], batch[:, 1:]).backward(); opt.step(); opt.zero_grad()
sync(); t = time.perf_counter()
for _ in range(5):
    model(batch[:, :-1], batch[:, 1:]).backward(); opt.step(); opt.zero_grad()
sync(); print("wrapped unsynced step ms %.1f" % ((time.perf_counter() - t) / 5 * 1e3))
# The same with updates starting during backward (phases cannot be timed apart: they overlap).
early, eopt = hm.wrap(copy.deepcopy(base), lr=1e-4, device=dev, dtype=torch.bfloat16,
                      device_memory=budget, chunk_mb=chunk_bytes / 2**20, step_in_backward=True)
for _ in range(3):
    early(batch[:, :-1], batch[:, 1:]).backward(); eopt.step(); eopt.zero_grad()
sync(); t = time.perf_counter()
for _ in range(5):
    early(batch[:, :-1], batch[:, 1:]).backward(); eopt.step(); eopt.zero_grad()
sync(); print("step_in_backward unsynced step ms %.1f (%d chunk updates started in backward)"
              % ((time.perf_counter() - t) / 5 * 1e3, eopt.in_backward.chunks_updated))
print(hm.report(early))
del early, eopt
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
with torch.profiler.profile(activities=acts) as prof:
    for _ in range(2):
        model(batch[:, :-1], batch[:, 1:]).backward(); opt.step(); opt.zero_grad()
    sync()
prof.export_chrome_trace(os.path.join(out, "wrapped_trace.json"))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
if dev == "cuda":
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
