"""The comparisons of scripts/metal-check.sh, in Python's standard library only (a Mac with
Xcode's command-line tools, which cargo needs, has python3; nothing is installed).

Each subcommand prints one line of detail and exits 0 when the check holds, 1 when it does not.
"""
import json
import math
import os
import platform
import random
import struct
import sys

DTYPES = {"F32": ("f", 4), "F64": ("d", 8), "I64": ("q", 8)}


def read_safetensors(path):
    """{name: (shape, [values])} for the f32/f64/i64 tensors of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in DTYPES:
            continue
        code, size = DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        count = (b - a) // size
        out[name] = (info["shape"], list(struct.unpack("<%d%s" % (count, code), body[a:b])))
    return out


def write_safetensors(path, name, shape, values, dtype):
    code, size = DTYPES[dtype]
    raw = struct.pack("<%d%s" % (len(values), code), *values)
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(raw)]}})
    header += " " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header.encode() + raw)


def max_diff(a, b):
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def losses(run):
    out = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("loss") is not None:
                out[r["step"]] = r["loss"]
    return out


def checkpoint(run, step, what):
    return read_safetensors(os.path.join(run, "checkpoints", "step-%07d" % step, what + ".safetensors"))


def cmd_resume(whole, resumed, first, last, tol):
    """The resumed run's losses (steps first..last) against the uninterrupted run's."""
    a, b = losses(whole), losses(resumed)
    first, last = int(first), int(last)
    steps = list(range(first, last + 1))
    missing = [s for s in steps if s not in a or s not in b]
    if missing:
        return False, "no loss logged for steps %s" % missing
    worst = max(abs(a[s] - b[s]) for s in steps)
    ok = worst <= float(tol) and all(math.isfinite(b[s]) for s in steps)
    return ok, "steps %d-%d: max |loss difference| %.3g (tolerance %s); last loss %.5f vs %.5f" % (
        first, last, worst, tol, b[last], a[last])


def cmd_ema(start_run, one_step_run, resumed, step, tol):
    step = int(step)
    """After one step the EMA is d*w0 + (1-d)*w1 with the trainer's ramp d = 2/11; the EMA of a
    longer run differs from its weights and from w0."""
    w0 = checkpoint(start_run, 1, "model")  # a step at lr = 1e-30: the initial weights
    w1 = checkpoint(one_step_run, 1, "model")
    e1 = checkpoint(one_step_run, 1, "ema")
    d = 2.0 / 11.0
    worst, moved = 0.0, 0.0
    for k, (_, v1) in w1.items():
        v0, ve = w0[k][1], e1[k][1]
        worst = max(worst, max_diff(ve, [d * x + (1 - d) * y for x, y in zip(v0, v1)]))
        moved = max(moved, max_diff(v1, v0))
    we, ee = checkpoint(resumed, step, "model"), checkpoint(resumed, step, "ema")
    from_w = max(max_diff(ee[k][1], we[k][1]) for k in we)
    from_w0 = max(max_diff(ee[k][1], w0[k][1]) for k in we)
    ok = worst <= float(tol) and moved > 0 and from_w > 0 and from_w0 > 0
    return ok, ("step 1: |EMA - (2/11 w0 + 9/11 w1)| max %.3g (tolerance %s; the step moved the "
                "weights by up to %.3g); step %d: EMA differs from the weights by up to %.3g and "
                "from the initial weights by up to %.3g") % (worst, tol, moved, step, from_w, from_w0)


def cmd_noise(info_json, out64, out32, n, seed):
    """Writes the same Gaussian latent (N, T, D) for the model `info --json` describes, in f64
    and in f32."""
    with open(info_json) as f:
        cfg = json.load(f)["config"]
    t = (cfg["img_size"] // cfg["patch_size"]) ** 2
    d = cfg["in_channels"] * cfg["patch_size"] ** 2
    rng = random.Random(int(seed))
    # Values exact in f32, so the two files hold the same numbers.
    v = [struct.unpack("f", struct.pack("f", rng.gauss(0.0, 1.0)))[0] for _ in range(int(n) * t * d)]
    write_safetensors(out64, "z", [int(n), t, d], v, "F64")
    write_safetensors(out32, "z", [int(n), t, d], v, "F32")
    return True, "z of shape (%s, %d, %d) in f64 and f32" % (n, t, d)


def cmd_samples(a, b, tol):
    """Two `sample --out-tensor` files: the same samples within `tol`."""
    sa, sb = read_safetensors(a)["samples"], read_safetensors(b)["samples"]
    if sa[0] != sb[0]:
        return False, "shapes differ: %s vs %s" % (sa[0], sb[0])
    bad = sum(1 for x in sa[1] + sb[1] if not math.isfinite(x))
    worst = max_diff(sa[1], sb[1])
    ok = bad == 0 and worst <= float(tol)
    return ok, "%s: max |difference| %.3g (tolerance %s), %d non-finite" % (sa[0], worst, tol, bad)


def bpds(path):
    with open(path) as f:
        return [json.loads(l)["bits_per_dim"] for l in f if l.startswith("{")]


def cmd_scores(a, b, rel):
    """Two `score --json` outputs: the same bits/dim per image within `rel` (relative)."""
    x, y = bpds(a), bpds(b)
    if len(x) != len(y) or not x:
        return False, "%d vs %d scores" % (len(x), len(y))
    worst = max(abs(p - q) / abs(q) for p, q in zip(x, y))
    return worst <= float(rel), "%d images: max relative difference %.3g (tolerance %s); mean %.4f vs %.4f" % (
        len(x), worst, rel, sum(x) / len(x), sum(y) / len(y))


def cmd_bench(gpu32, gpu16, cpu):
    """`bench --json` on the GPU (f32, bf16) and on the CPU: ratios, same run."""
    def load(p):
        with open(p) as f:
            rows = [json.loads(l) for l in f if l.startswith("{")]
        return {r["config"]: r for r in rows} or None
    g, h, c = load(gpu32), load(gpu16), load(cpu)
    if not (g and h and c):
        return False, "a bench produced no JSON"
    parts = []
    for cfg in c:
        for name, k, higher in [("train", "train_step_s", False), ("score", "score_images_per_s", True),
                                ("sample16", "sample16_s", False)]:
            try:
                r32 = g[cfg][k] / c[cfg][k] if higher else c[cfg][k] / g[cfg][k]
                r16 = h[cfg][k] / c[cfg][k] if higher else c[cfg][k] / h[cfg][k]
                parts.append("%s %s: %.2fx f32, %.2fx bf16" % (cfg, name, r32, r16))
            except (KeyError, TypeError, ZeroDivisionError):
                pass
    return bool(parts), "speed-up over the CPU: " + "; ".join(parts)


def cmd_summary(out, device):
    steps = []
    with open(os.path.join(out, "steps.jsonl")) as f:
        for line in f:
            steps.append(json.loads(line))
    s = {
        "steps": steps,
        "device": device,
        "os": platform.platform(),
        "machine": platform.machine(),
        "ok": all(x["ok"] for x in steps),
    }
    for name in ["version", "commit"]:
        p = os.path.join(out, name + ".txt")
        if os.path.exists(p):
            s[name] = open(p).read().strip()
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    w = max(len(x["name"]) for x in steps) if steps else 4
    for x in steps:
        print("%-*s  %-6s %s" % (w, x["name"], "ok" if x["ok"] else "FAILED", x["detail"]))
    print("summary: %s (%d of %d steps ok)" % (os.path.join(out, "summary.json"),
                                              sum(x["ok"] for x in steps), len(steps)))
    return s["ok"], ""


if __name__ == "__main__":
    fn = globals()["cmd_" + sys.argv[1]]
    ok, detail = fn(*sys.argv[2:])
    if detail:
        print(detail)
    sys.exit(0 if ok else 1)
