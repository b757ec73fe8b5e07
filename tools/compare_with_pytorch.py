"""Per-step losses of `nbit fit` against PyTorch on the same data, initial weights and batches.

Not part of the build or CI (nbit never depends on PyTorch). Needs torch and safetensors in the
Python that runs it, and a release build: `cargo build --release`, then
`python tools/compare_with_pytorch.py [PRECISION]` (a precision prints every step).
"""
import csv, os, subprocess, sys, tempfile
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP = tempfile.mkdtemp(prefix='nbit-vs-torch-')
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import save_file, load_file
torch.manual_seed(0)
rows = list(csv.reader(open(os.path.join(ROOT, 'examples/data/digits.csv'))))
header, rows = rows[0], rows[1:241]
with open(f'{TMP}/small.csv','w') as f:
    f.write(','.join(header)+'\n')
    for r in rows: f.write(','.join(r)+'\n')
X = torch.tensor([[float(v) for v in r[:64]] for r in rows], dtype=torch.float64)
Y = torch.tensor([int(r[64]) for r in rows])
model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f'{TMP}/init.safetensors')
B, LR, MOM, EPOCHS = 20, 0.01, 0.9, 3
def torch_losses(prec, max_steps=None):
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    m.load_state_dict(load_file(f'{TMP}/init.safetensors'))
    dt = {'32-true': torch.float32, '64-true': torch.float64, '16-true': torch.float16, 'bf16-true': torch.bfloat16, 'bf16-mixed': torch.float32}[prec]
    m = m.to(dt)
    opt = torch.optim.SGD(m.parameters(), lr=LR, momentum=MOM)
    out = []
    for e in range(EPOCHS):
        for i in range(0, len(Y), B):
            x, y = X[i:i+B].to(dt), Y[i:i+B]
            if prec == 'bf16-mixed':
                with torch.autocast('cpu', dtype=torch.bfloat16):
                    loss = F.cross_entropy(m(x), y)
            else:
                loss = F.cross_entropy(m(x), y)
            out.append(loss.item())
            opt.zero_grad(); loss.backward(); opt.step()
            if len(out) == max_steps:
                return out, m
    return out, m
def nbit_losses(prec, max_steps=None):
    cmd = [os.path.join(ROOT, 'target/release/nbit'), 'fit', '--data', f'{TMP}/small.csv', '--init', f'{TMP}/init.safetensors',
           '--hidden', '32', '--classes', '10', '--no-shuffle', '--batch-size', str(B), '--optimizer', 'sgd', '--lr', str(LR),
           '--momentum', str(MOM), '--epochs', str(EPOCHS), '--precision', prec, '--accelerator', 'cpu',
           '--log-csv', f'{TMP}/{prec}.csv', '--save', f'{TMP}/{prec}.out.safetensors', '--json']
    cmd += ['--max-steps', str(max_steps)] if max_steps else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    log = list(csv.DictReader(open(f'{TMP}/{prec}.csv')))
    return [float(l['loss']) for l in log]
print(f"torch {torch.__version__}; 240 digits rows, MLP 64-32-10, SGD(lr={LR}, momentum={MOM}), batch {B}, {EPOCHS} epochs, no shuffle, same init\n")
def differing_after_one_step(prec):
    """How many weights differ from PyTorch's, bit for bit, after one optimizer step."""
    _, m = torch_losses(prec, 1)
    nbit_losses(prec, 1)
    w, sd = load_file(f'{TMP}/{prec}.out.safetensors'), m.state_dict()
    return sum((w[k].double() != sd[k].double()).sum().item() for k in sd), sum(v.numel() for v in sd.values())
print(f"{'precision':<11} {'steps':>5} {'max |rel diff| per step':>24} {'first loss nbit / torch':>32} {'last loss nbit / torch':>34} {'weights max |diff|':>19} {'step 1: weights differing':>26}")
for prec in ['64-true', '32-true', 'bf16-mixed', 'bf16-true', '16-true']:
    t, m = torch_losses(prec)
    n = nbit_losses(prec)
    assert len(t) == len(n), (len(t), len(n))
    rel = max(abs(a-b)/abs(b) for a, b in zip(n, t))
    w = load_file(f'{TMP}/{prec}.out.safetensors')
    sd = m.state_dict()
    wd = max((w[k].double() - sd[k].double()).abs().max().item() for k in sd)
    d1, total = differing_after_one_step(prec)
    print(f"{prec:<11} {len(t):>5} {rel:>24.3e} {n[0]:>15.10g} / {t[0]:<15.10g} {n[-1]:>16.10g} / {t[-1]:<16.10g} {wd:>18.3e} {f'{d1} of {total}':>26}")
if len(sys.argv) > 1:
    t, _ = torch_losses(sys.argv[1]); n = nbit_losses(sys.argv[1])
    for i, (a, b) in enumerate(zip(n, t)): print(i+1, a, b, '' if a == b else '<-')
