"""Training throughput of nbit against plain PyTorch on the same MLP configurations.

Not part of the build or CI (nbit never depends on PyTorch). Needs torch in the Python that runs
it. Run from the project root:

    python3 tools/bench_mlp_vs_pytorch.py [--threads 2] [--repeats 3] [--only big|small]
    python3 tools/bench_mlp_vs_pytorch.py --gemm     # square GEMM per dtype instead

Each case runs the same model (Linear/ReLU stack, cross-entropy, SGD lr 0.01 momentum 0.9), batch
size, sample count and epoch count in both. In both, the first epoch is a warm-up and the figure
is the median samples/s of the epochs after it. nbit and PyTorch alternate, `--repeats` times, and
the table shows the best figure of each so that noise on a shared machine hurts both alike. The
ratio is nbit / PyTorch from this one run.
"""
import argparse, json, os, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_executable(name):
    """Builds the bench target `name` (cargo bench --no-run) and returns its executable."""
    out = subprocess.run(['cargo', 'bench', '--no-run', '--bench', name, '--message-format=json'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get('reason') == 'compiler-artifact' and msg['target']['name'] == name \
                and msg.get('executable'):
            return msg['executable']
    sys.exit(f'cargo bench --no-run --bench {name} produced no executable')

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


def nbit_rate(exe, precision, c, threads):
    cmd = [exe, '--precision', precision, '--inputs', str(c['inputs']),
           '--hidden', ','.join(map(str, c['hidden'])), '--classes', str(c['classes']),
           '--batch-size', str(c['batch']), '--samples', str(c['samples']),
           '--epochs', str(c['epochs']), '--threads', str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f'{" ".join(cmd)} failed: {out.stderr.strip()}')
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith('samples_per_sec='), last
    return float(last.split('=')[1])


def print_cpu(torch, a):
    cpu = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')
    flags = next((l.split(':', 1)[1].split() for l in open('/proc/cpuinfo') if l.startswith('flags')), [])
    isa = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'amx_bf16') if f in flags]
    what = 'best of each' if a.gemm else 'best of alternating runs, each the median epoch after a warm-up'
    print(f'CPU: {cpu} ({" ".join(isa)}); torch {torch.__version__}; threads {a.threads}; '
          f'{a.repeats} repeats, {what}')


def gemm_table(torch, threads, repeats):
    """Square GEMM GFLOP/s per dtype: nbit (examples/gemm_table --csv) against torch.mm. The
    ratio is to PyTorch in that dtype, and for 16-bit types to the faster of that and PyTorch in
    f32 (a 16-bit product can always be computed by widening to f32)."""
    torch.set_num_threads(threads)
    exe = bench_executable('gemm')
    nb = {}
    for _ in range(repeats):
        env = dict(os.environ, NBIT_NUM_THREADS=str(threads))
        out = subprocess.run([exe, '--csv'], capture_output=True, text=True, env=env, check=True)
        for line in out.stdout.strip().splitlines()[1:]:
            n, dt, g = line.split(',')
            nb[(int(n), dt)] = max(nb.get((int(n), dt), 0.0), float(g))
    dts = {'f32': torch.float32, 'f64': torch.float64, 'bf16': torch.bfloat16, 'f16': torch.float16}
    pt = {}
    for n in sorted({k[0] for k in nb}):
        for name, dt in dts.items():
            a, b = torch.rand(n, n, dtype=dt), torch.rand(n, n, dtype=dt)
            best, total, runs = 1e9, 0.0, 0
            while runs < 3 or (total < 0.5 and runs < 20):
                s = time.perf_counter(); torch.mm(a, b); t = time.perf_counter() - s
                best, total, runs = min(best, t), total + t, runs + 1
            pt[(n, name)] = 2 * n ** 3 / best / 1e9
    print('| n | dtype | nbit GFLOP/s | PyTorch GFLOP/s | PyTorch f32 | nbit / reference |')
    print('|---|---|---|---|---|---|')
    for (n, name), g in sorted(nb.items()):
        ref = max(pt[(n, name)], pt[(n, 'f32')]) if name in ('bf16', 'f16') else pt[(n, name)]
        print(f'| {n} | {name} | {g:.0f} | {pt[(n, name)]:.0f} | {pt[(n, "f32")]:.0f} | {g / ref:.2f} |')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--only', choices=list(CASES))
    ap.add_argument('--precision', choices=PRECISIONS, action='append')
    ap.add_argument('--gemm', action='store_true', help='square GEMM per dtype instead of training')
    a = ap.parse_args()
    if a.gemm:
        import torch
        print_cpu(torch, a)
        gemm_table(torch, a.threads, a.repeats)
        return
    exe = bench_executable('bench_mlp')
    import torch
    print_cpu(torch, a)
    print(f'| case | precision | nbit samples/s | PyTorch samples/s | nbit / PyTorch |')
    print(f'|---|---|---|---|---|')
    for name, c in CASES.items():
        if a.only and name != a.only:
            continue
        for p in a.precision or PRECISIONS:
            n = t = 0.0
            for _ in range(a.repeats):
                n = max(n, nbit_rate(exe, p, c, a.threads))
                t = max(t, torch_rate(torch, p, c, a.threads))
            desc = f"{name} {'-'.join(map(str, [c['inputs']] + c['hidden'] + [c['classes']]))} b{c['batch']}"
            print(f'| {desc} | {p} | {n:,.0f} | {t:,.0f} | {n / t:.2f} |', flush=True)


if __name__ == '__main__':
    main()
