"""Writes tests/data/pytorch_reference.json: values PyTorch itself computed, for bit-for-bit tests.

Not part of the build or CI (nbit never depends on PyTorch). Run with torch installed:
`python tools/make_pytorch_reference.py`. The file records the torch version that made it.

Contents (every float stored as its bit pattern, so nothing is lost in JSON):
- `scaler`: `torch._amp_update_scale_` (GradScaler's update) over 400 steps with inexact factors
  (init 1000, growth 1.1, backoff 0.9, interval 3) and a fixed found-inf pattern; the scale and
  growth tracker after every step.
- `adamw`: `torch.optim.AdamW` (defaults but lr 1e-2, i.e. betas (0.9, 0.999), eps 1e-8,
  weight decay 1e-2) on 1000 parameters for 3 steps, in float32 and in bfloat16 (bf16-true);
  the initial parameters, the gradient of each step and the parameters after each step.
  `sqrt_inexact` lists, per step, the elements where PyTorch's `exp_avg_sq.sqrt()` is not the
  correctly rounded square root (its CPU sqrt goes through MKL's vector math, accurate to 1 ulp,
  for large float32 tensors); nbit rounds correctly, so those elements may differ by an ulp.
- `sgd`: `torch.optim.SGD` in float32 on 1000 parameters for 3 steps, in four settings (plain;
  weight decay; momentum with dampening and weight decay; Nesterov momentum with weight decay).
"""
import json, os
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'data', 'pytorch_reference.json')


def bits(t):
    """Bit patterns of a float32 or bfloat16 tensor as a list of ints."""
    if t.dtype == torch.float32:
        return [b & 0xFFFFFFFF for b in t.contiguous().view(torch.int32).tolist()]
    if t.dtype == torch.bfloat16:
        return (t.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    raise TypeError(t.dtype)


def scaler():
    init, growth, backoff, interval, steps = 1000.0, 1.1, 0.9, 3, 400
    scale = torch.full((1,), init, dtype=torch.float32)
    tracker = torch.zeros(1, dtype=torch.int32)
    # A fixed pattern with runs long enough to grow: steps where i*i % 11 == 3 overflow (2 in 11).
    flags = [int(i * i % 11 == 3) for i in range(steps)]
    scales, trackers = [], []
    for f in flags:
        found = torch.full((1,), float(f), dtype=torch.float32)
        torch._amp_update_scale_(scale, tracker, found, growth, backoff, interval)
        scales.append(bits(scale)[0])
        trackers.append(int(tracker.item()))
    return dict(init_scale=init, growth_factor=growth, backoff_factor=backoff,
                growth_interval=interval, found_inf=flags, scale_bits=scales, growth_tracker=trackers)


def adamw(dtype):
    g = torch.Generator().manual_seed(1234)
    n, steps, lr = 1000, 3, 1e-2
    p0 = (torch.randn(n, generator=g) * 0.5).to(dtype)
    grads = [(torch.randn(n, generator=g) * 10.0 ** torch.randint(-4, 1, (n,), generator=g)).to(dtype)
             for _ in range(steps)]
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=lr)
    after, inexact = [], []
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
        after.append(bits(p.detach()))
        v = opt.state[p]['exp_avg_sq']
        if dtype == torch.float32:
            # numpy's float32 sqrt is IEEE's, correctly rounded.
            ieee = np.sqrt(v.numpy())
            inexact.append(np.nonzero(v.sqrt().numpy() != ieee)[0].tolist())
        else:
            inexact.append([])
    return dict(lr=lr, betas=list(opt.defaults['betas']), eps=opt.defaults['eps'],
                weight_decay=opt.defaults['weight_decay'],
                initial=bits(p0), grads=[bits(x) for x in grads], after=after, sqrt_inexact=inexact)


def sgd():
    cases = []
    for momentum, dampening, nesterov, wd in [(0.0, 0.0, False, 0.0), (0.0, 0.0, False, 0.01),
                                              (0.9, 0.1, False, 0.01), (0.9, 0.0, True, 0.01)]:
        g = torch.Generator().manual_seed(99)
        p0 = torch.randn(1000, generator=g)
        grads = [torch.randn(1000, generator=g) * 0.25 for _ in range(3)]
        p = torch.nn.Parameter(p0.clone())
        opt = torch.optim.SGD([p], lr=0.05, momentum=momentum, dampening=dampening,
                              nesterov=nesterov, weight_decay=wd)
        after = []
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
            after.append(bits(p.detach()))
        cases.append(dict(lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=wd, initial=bits(p0), grads=[bits(x) for x in grads], after=after))
    return cases


def main():
    ref = dict(torch_version=torch.__version__, made_by='tools/make_pytorch_reference.py',
               scaler=scaler(),
               adamw=dict(f32=adamw(torch.float32), bf16=adamw(torch.bfloat16)),
               sgd=sgd())
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, 'w') as f:
        json.dump(ref, f, separators=(',', ':'))
        f.write('\n')
    print(f'wrote {OUT} (torch {torch.__version__})')


if __name__ == '__main__':
    main()
