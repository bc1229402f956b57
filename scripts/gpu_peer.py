#!/usr/bin/env python3
"""Times apple/ml-tarflow's PyTorch model (transformer_flow.Model, called unchanged) on a GPU, with
the shapes of `tarflow bench --config small`: a training step (forward + loss + backward + AdamW,
batch 32), scoring (no-grad forward + bits/dim, batch 64, images/s) and KV-cached sampling of 16
images without and with guidance 2.0. Prints one JSON object.

Usage: TARFLOW_SRC=DIR python3 gpu_peer.py [--device cuda] [--dtype f32|bf16]
(DIR holds upstream's transformer_flow.py; it is copied along by scripts/gpu-check.sh, never
committed.)
"""
import argparse
import json
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument('--device', default='cuda')
ap.add_argument('--dtype', default='f32', choices=['f32', 'bf16'])
ap.add_argument('--iters', type=int, default=10)
args = ap.parse_args()

src = os.environ.get('TARFLOW_SRC', '')
if not os.path.isfile(os.path.join(src, 'transformer_flow.py')):
    sys.exit('set TARFLOW_SRC to a folder holding ml-tarflow\'s transformer_flow.py')
sys.path.insert(0, src)
import math  # noqa: E402

import torch  # noqa: E402
import transformer_flow  # noqa: E402

dev = torch.device(args.device)
torch.manual_seed(0)
C, S, P = 3, 32, 4
T, D = (S // P) ** 2, C * P * P
model = transformer_flow.Model(in_channels=C, img_size=S, patch_size=P, channels=256, num_blocks=4,
                               layers_per_block=2, nvp=True, num_classes=10).to(dev)
amp = torch.autocast('cuda', dtype=torch.bfloat16, enabled=args.dtype == 'bf16' and dev.type == 'cuda')


def sync():
    if dev.type == 'cuda':
        torch.cuda.synchronize()


def timed(step, iters):
    step()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


g = torch.Generator(device='cpu').manual_seed(1)
x = (torch.rand(32, C, S, S, generator=g) * 2 - 1).to(dev)
y = torch.randint(10, (32,), generator=g).to(dev)
opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95), lr=1e-4, weight_decay=1e-4)


def train_step():
    opt.zero_grad()
    with amp:
        z, _, logdets = model(x, y)
        loss = model.get_loss(z, logdets)
    loss.backward()
    opt.step()


train_s = timed(train_step, args.iters)
model.eval()
xs = (torch.rand(64, C, S, S, generator=g) * 2 - 1).to(dev)
ys = torch.randint(10, (64,), generator=g).to(dev)


def score():
    with torch.no_grad(), amp:
        z, _, logdets = model(xs, ys)
        log_p = (-0.5 * (z.float() ** 2 + math.log(2 * math.pi))).flatten(1).sum(-1) - math.log(128) * T * D
        float(((-log_p / (C * S * S) - logdets.float()) / math.log(2)).mean())


score_s = timed(score, args.iters)
z = torch.randn(16, T, D, generator=g).to(dev)
yl = torch.randint(10, (16,), generator=g).to(dev)


def sample(w):
    def run():
        with torch.no_grad(), amp:
            float(model.reverse(z, yl, guidance=w).float().sum())
    return run


print(json.dumps(dict(
    impl='ml-tarflow (PyTorch %s)' % torch.__version__, device=str(dev),
    gpu=torch.cuda.get_device_name(0) if dev.type == 'cuda' else None, dtype=args.dtype,
    train_step_s=train_s, score_images_per_s=64 / score_s,
    sample16_s=timed(sample(0.0), max(3, args.iters // 2)),
    sample16_cfg_s=timed(sample(2.0), max(3, args.iters // 2)))))
