"""torch.mm on the small config's training GEMM shapes (rows = 2048, C = 256, hidden = 1024),
2 threads: into a preallocated output and into a fresh one. Run with the PyTorch of
../shared/peer (a venv with torch): python 2026-12-02-torch-gemm.py"""
import torch, time
torch.set_num_threads(2)
shapes=[(2048,256,768),(2048,256,1024),(2048,1024,256),(2048,256,256),(768,2048,256),(1024,2048,256),(256,2048,1024),(2048,768,256)]
for m,k,n in shapes:
    a=torch.randn(m,k); b=torch.randn(k,n); c=torch.empty(m,n)
    for _ in range(5): torch.mm(a,b,out=c); d=a@b
    it=50
    t=time.perf_counter()
    for _ in range(it): torch.mm(a,b,out=c)
    t1=(time.perf_counter()-t)/it
    t=time.perf_counter()
    for _ in range(it): d=a@b
    t2=(time.perf_counter()-t)/it
    f=2*m*k*n/1e9
    print(f"{m}x{k}·{k}x{n}: out= {f/t1:.0f} GFLOP/s, fresh output {f/t2:.0f} GFLOP/s")
