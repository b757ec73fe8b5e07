"""Writes tests/data/transformer_reference.json: torch.nn.Transformer's outputs and gradients, for
nbit's parity tests (tests/transformer.rs).

Not part of the build or CI (nbit never depends on PyTorch). Run with torch installed:
`python tools/make_transformer_reference.py`. The file records the torch version that made it.

Two small configurations (d_model 8, 2 heads, 2 encoder and 2 decoder layers, feed-forward 16,
dropout 0): post-norm ReLU with batch_first=True, and pre-norm GELU with batch_first=False. Each
has a causal target mask and a key-padding mask on the source (batch row 1's last two positions),
given to the encoder and to the decoder's memory attention. Recorded, every float as the bits of
its float64 (or float32) value:
- `state_dict`: every parameter, float64 (torch's own initialisation, seed 0);
- `src`, `tgt`, `weights`: the inputs and the weights `r` of the loss `sum(r * out)`;
- `out64`, `grads64`: the output and the gradient of every parameter and of `src` and `tgt`, in
  float64 (`model.double()`);
- `out32`: the output in float32 (`model.float()`, inputs rounded to float32);
- `out_bf16`, `grads_bf16`: under `torch.autocast("cpu", torch.bfloat16)` with float32 master
  weights: the output (bfloat16, stored as float32 bits) and the float32 parameter gradients.

And `demo`: Lightning's demo language model (`lightning.pytorch.demos.Transformer`, vocabulary
11, ninp 8, 2 heads, nhid 16, 2 + 2 layers, dropout 0) in float64: its state_dict, token inputs
and targets, its forward output (log-probabilities) and the gradient of every parameter of its
training_step's loss (needs `pip install lightning`).
"""
import json, os
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'data', 'transformer_reference.json')


def bits64(t):
    return [b & 0xFFFFFFFFFFFFFFFF for b in t.detach().double().contiguous().view(torch.int64).flatten().tolist()]


def bits32(t):
    return [b & 0xFFFFFFFF for b in t.detach().float().contiguous().view(torch.int32).flatten().tolist()]


def case(name, norm_first, activation, batch_first):
    torch.manual_seed(0)
    d, h, b, s, t = 8, 2, 2, 5, 4
    model = torch.nn.Transformer(d_model=d, nhead=h, num_encoder_layers=2, num_decoder_layers=2,
                                 dim_feedforward=16, dropout=0.0, activation=activation,
                                 batch_first=batch_first, norm_first=norm_first)
    model.train()
    src = torch.randn(b, s, d, dtype=torch.float64)
    tgt = torch.randn(b, t, d, dtype=torch.float64)
    weights = torch.randn(b, t, d, dtype=torch.float64)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[1, -2:] = True

    def run(dtype, autocast=False):
        m = model.to(dtype)
        m.zero_grad()
        x = src.to(dtype).clone().requires_grad_(True)
        y = tgt.to(dtype).clone().requires_grad_(True)
        mask = tgt_mask.to(dtype)
        xs, ys = (x, y) if batch_first else (x.transpose(0, 1), y.transpose(0, 1))
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = m(xs, ys, tgt_mask=mask, src_key_padding_mask=pad, memory_key_padding_mask=pad)
        if not batch_first:
            out = out.transpose(0, 1)
        loss = (out.to(dtype) * weights.to(dtype)).sum()
        loss.backward()
        grads = {k: p.grad.detach().clone() for k, p in m.named_parameters()}
        grads['src'], grads['tgt'] = x.grad, y.grad
        return out, grads

    state = {k: bits64(v.double()) for k, v in model.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    out64, grads64 = run(torch.float64)
    out32, _ = run(torch.float32)
    out16, grads16 = run(torch.float32, autocast=True)
    return dict(name=name, norm_first=norm_first, activation=activation, batch_first=batch_first,
                d_model=d, nhead=h, num_layers=2, dim_feedforward=16, batch=b, src_len=s, tgt_len=t,
                padded=[[1, s - 2], [1, s - 1]],
                shapes=shapes, state_dict=state,
                src=bits64(src), tgt=bits64(tgt), weights=bits64(weights),
                out64=bits64(out64), grads64={k: bits64(g) for k, g in grads64.items()},
                out32=bits32(out32),
                out_bf16=bits32(out16.float()), out_bf16_dtype=str(out16.dtype),
                grads_bf16={k: bits32(g) for k, g in grads16.items() if k not in ('src', 'tgt')})


def demo():
    """Lightning's demo model itself (`lightning.pytorch.demos.Transformer`, dropout 0), in
    float64: its forward(inputs, target) and the loss of its training_step, nll_loss against the
    targets."""
    from lightning.pytorch.demos import Transformer
    import lightning
    torch.manual_seed(0)
    vocab, b, t = 11, 2, 5
    model = Transformer(vocab_size=vocab, ninp=8, nhead=2, nhid=16, nlayers=2, dropout=0.0).double()
    model.train()
    inputs = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(2))
    state = {k: bits64(v) for k, v in model.state_dict().items()}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    out = model(inputs, target)
    loss = torch.nn.functional.nll_loss(out, target.view(-1))
    loss.backward()
    grads = {k: bits64(p.grad) for k, p in model.named_parameters()}
    return dict(lightning_version=lightning.__version__, vocab_size=vocab, ninp=8, nhead=2, nhid=16,
                nlayers=2, inputs=inputs.flatten().tolist(), target=target.flatten().tolist(),
                batch=b, length=t, shapes=shapes, state_dict=state, out64=bits64(out),
                loss64=bits64(loss.reshape(1))[0], grads64=grads)


def main():
    cases = [case('post-norm relu, batch_first', False, 'relu', True),
             case('pre-norm gelu, sequence first', True, 'gelu', False)]
    with open(OUT, 'w') as f:
        json.dump(dict(torch_version=torch.__version__, cases=cases, demo=demo()), f, separators=(',', ':'))
    print('wrote', OUT, os.path.getsize(OUT), 'bytes')


if __name__ == '__main__':
    main()
