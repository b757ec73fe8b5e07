"""Training throughput of nbit against plain PyTorch on the same MLP configurations.

Not part of the build or CI (nbit never depends on PyTorch). Needs torch in the Python that runs
it. Run from the project root:

    cargo build --release --example bench_mlp
    python3 tools/bench_mlp_vs_pytorch.py [--threads 2] [--repeats 3] [--only big|small]

Each case runs the same model (Linear/ReLU stack, cross-entropy, SGD lr 0.01 momentum 0.9), batch
size, sample count and epoch count in both. In both, the first epoch is a warm-up and the figure
is the median samples/s of the epochs after it. nbit and PyTorch alternate, `--repeats` times, and
the table shows the best figure of each so that noise on a shared machine hurts both alike. The
ratio is nbit / PyTorch from this one run.
"""
import argparse, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, 'target', 'release', 'examples', 'bench_mlp')
PRECISIONS = ['32-true', '64-true', 'bf16-mixed', 'bf16-true', '16-true']
CASES = {
    'big': dict(inputs=784, hidden=[1024, 1024], classes=10, batch=256, samples=4096, epochs=4),
    'small': dict(inputs=64, hidden=[128, 128], classes=10, batch=64, samples=16384, epochs=4),
}


def torch_rate(torch, precision, c, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dtype = {'32-true': torch.float32, '64-true': torch.float64, '16-true': torch.float16,
             'bf16-true': torch.bfloat16, 'bf16-mixed': torch.float32}[precision]
    sizes = [c['inputs']] + c['hidden'] + [c['classes']]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(c['samples'], c['inputs'], generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    y = torch.randint(0, c['classes'], (c['samples'],), generator=g)
    rates = []
    for epoch in range(c['epochs']):
        start = time.perf_counter()
        for i in range(0, c['samples'], c['batch']):
            xb, yb = x[i:i + c['batch']], y[i:i + c['batch']]
            if precision == 'bf16-mixed':
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(xb), yb)
            else:
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()
        rates.append(c['samples'] / (time.perf_counter() - start))
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def nbit_rate(precision, c, threads):
    cmd = [BIN, '--precision', precision, '--inputs', str(c['inputs']),
           '--hidden', ','.join(map(str, c['hidden'])), '--classes', str(c['classes']),
           '--batch-size', str(c['batch']), '--samples', str(c['samples']),
           '--epochs', str(c['epochs']), '--threads', str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f'{" ".join(cmd)} failed: {out.stderr.strip()}')
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith('samples_per_sec='), last
    return float(last.split('=')[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--only', choices=list(CASES))
    ap.add_argument('--precision', choices=PRECISIONS, action='append')
    a = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit('build first: cargo build --release --example bench_mlp')
    import torch
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
    flags = next((l.split(':', 1)[1].split() for l in open('/proc/cpuinfo') if l.startswith('flags')), [])
    isa = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'amx_bf16') if f in flags]
    print(f'CPU: {cpu} ({" ".join(isa)}); torch {torch.__version__}; threads {a.threads}; '
          f'best of {a.repeats} alternating runs, each the median epoch after a warm-up')
    print(f'| case | precision | nbit samples/s | PyTorch samples/s | nbit / PyTorch |')
    print(f'|---|---|---|---|---|')
    for name, c in CASES.items():
        if a.only and name != a.only:
            continue
        for p in a.precision or PRECISIONS:
            n = t = 0.0
            for _ in range(a.repeats):
                n = max(n, nbit_rate(p, c, a.threads))
                t = max(t, torch_rate(torch, p, c, a.threads))
            desc = f"{name} {'-'.join(map(str, [c['inputs']] + c['hidden'] + [c['classes']]))} b{c['batch']}"
            print(f'| {desc} | {p} | {n:,.0f} | {t:,.0f} | {n / t:.2f} |', flush=True)


if __name__ == '__main__':
    main()
