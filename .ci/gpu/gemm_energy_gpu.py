# Sustained speed, board power and SM clock of the 70B Block-AP GEMM shape (gate/up: 4096 x 28672 x 8192) by
# operand orientation: 400 back-to-back launches on a GPU warmed for 8 s, power sampled by nvidia-smi every 20 ms.
# Runs on the device with its PyTorch: `python3 gemm_energy_gpu.py`.
import subprocess, time, torch
def power_sampler():
    return subprocess.Popen(["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits", "-lms", "20"], stdout=subprocess.PIPE, text=True)
def mean_power(p):
    p.terminate(); out = p.communicate()[0]
    rows = [l.split(",") for l in out.strip().splitlines() if "," in l]
    vals = [(float(a), float(b)) for a, b in rows[2:]]  # the first samples may predate the launches
    return sum(v for v, _ in vals) / max(len(vals), 1), sorted(c for _, c in vals)[len(vals) // 2] if vals else 0
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
dev = "cuda"
T, C, F = 4096, 8192, 28672
x = torch.randn(T, C, device=dev, dtype=torch.bfloat16)
w = torch.randn(F, C, device=dev, dtype=torch.bfloat16) * 0.02
dy = torch.randn(T, F, device=dev, dtype=torch.bfloat16)
cases = {
  "fwd y=x@w.T": lambda: x @ w.t(),
  "fwd y=(w@x.T).T": lambda: (w @ x.t()).t(),
  "dX dx=dy@w": lambda: dy @ w,
  "dX dx=(w.T@dy.T).T": lambda: (w.t() @ dy.t()).t(),
  "dW dw=dy.T@x": lambda: dy.t() @ x,
  "dW dw=(x.T@dy).T": lambda: (x.t() @ dy).t(),
}
# warm the GPU to its sustained state
t_end = time.time() + 8
while time.time() < t_end:
    for _ in range(20): x @ w.t()
    torch.cuda.synchronize()
flops = 2 * T * C * F
for rep in range(2):
    for name, f in cases.items():
        for _ in range(5): f()
        torch.cuda.synchronize()
        n = 400
        ps = power_sampler(); time.sleep(0.1)
        t0 = time.time()
        for _ in range(n): f()
        torch.cuda.synchronize()
        t1 = time.time()
        w_mean, clk = mean_power(ps)
        dt = (t1 - t0) / n
        print(f"{name:22s} {dt*1e3:7.3f} ms  {flops/dt/1e12:6.1f} TFLOP/s  {w_mean:6.1f} W  {w_mean*dt*1e3:7.1f} mJ/GEMM  SM {clk:.0f} MHz", flush=True)
