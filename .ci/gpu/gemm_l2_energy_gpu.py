# Energy per FLOP of bf16 GEMMs whose operands stream from DRAM against GEMMs of the same FLOPs whose operands stay in
# L2, and of the 70B gate GEMM (4096 x 28672 x 8192) split along N or M: does the GEMMs' DRAM traffic (~28.6 GB a 70B
# Block-AP step) cost enough power to matter at the 700 W cap? Each case runs back to back for 2 s after 8 s of
# warm-up, power sampled by nvidia-smi every 20 ms; plus a 1 GiB device copy for the power of a memory-bound pass.
# Runs on the device with its PyTorch: `python3 gemm_l2_energy_gpu.py`.
import subprocess, time, torch
def sampler():
    return subprocess.Popen(["nvidia-smi","--query-gpu=power.draw,clocks.sm,temperature.gpu","--format=csv,noheader,nounits","-lms","20"],stdout=subprocess.PIPE,text=True)
def stop(p):
    p.terminate(); out=p.communicate()[0]
    rows=[l.split(",") for l in out.strip().splitlines() if "," in l][2:]
    if not rows: return 0,0,0
    pw=sum(float(r[0]) for r in rows)/len(rows); clk=sorted(float(r[1]) for r in rows)[len(rows)//2]; t=float(rows[-1][2])
    return pw,clk,t
dev="cuda"; bf=torch.bfloat16
T,C,F=4096,8192,28672
x=torch.randn(T,C,device=dev,dtype=bf); w=torch.randn(F,C,device=dev,dtype=bf)*0.02
out=torch.empty(T,F,device=dev,dtype=bf)
xs=torch.randn(2048,4096,device=dev,dtype=bf); ws=torch.randn(2048,4096,device=dev,dtype=bf)*0.02
xm=torch.randn(4096,4096,device=dev,dtype=bf); wm=torch.randn(4096,4096,device=dev,dtype=bf)*0.02
big=torch.empty(1<<30,device=dev,dtype=torch.uint8); big2=torch.empty_like(big)
def gate(): torch.matmul(x,w.t(),out=out)
def nchunk(k):
    n=F//k
    def f():
        for i in range(k): torch.matmul(x,w[i*n:(i+1)*n].t(),out=out[:,i*n:(i+1)*n])
    return f
def mchunk(k):
    m=T//k
    def f():
        for i in range(k): torch.matmul(x[i*m:(i+1)*m],w.t(),out=out[i*m:(i+1)*m])
    return f
def l2small():  # 56 x (2048x2048x4096) = the gate GEMM's FLOPs, operands 16+16 MB stay in L2
    for _ in range(56): xs@ws.t()
def mid():  # 14 x 4096^3 = the gate GEMM's FLOPs, operands 32+32 MB
    for _ in range(14): xm@wm.t()
def copy(): big2.copy_(big)
cases=[("gate 4096x28672x8192",gate,2*T*C*F),("gate N in 4 chunks",nchunk(4),2*T*C*F),("gate N in 14 chunks",nchunk(14),2*T*C*F),
       ("gate M in 4 chunks",mchunk(4),2*T*C*F),("56 x 2048x2048x4096 (L2)",l2small,2*T*C*F),("14 x 4096^3",mid,2*T*C*F),("copy 1 GiB",copy,0)]
t_end=time.time()+8
while time.time()<t_end:
    for _ in range(20): gate()
    torch.cuda.synchronize()
for rep in range(2):
    for name,f,fl in cases:
        for _ in range(3): f()
        torch.cuda.synchronize()
        p=sampler(); time.sleep(0.1)
        n=0; t0=time.time()
        while time.time()-t0<2.0:
            for _ in range(10): f()
            n+=10; torch.cuda.synchronize()
        dt=(time.time()-t0)/n
        pw,clk,tmp=stop(p)
        extra=f"{fl/dt/1e12:6.1f} TFLOP/s {pw*dt/ (fl/1e12):6.3f} J/TFLOP" if fl else f"{2*(1<<30)/dt/1e12:5.2f} TB/s"
        print(f"{name:28s} {dt*1e3:8.3f} ms {extra}  {pw:6.1f} W  SM {clk:.0f} MHz  {tmp:.0f} C",flush=True)
