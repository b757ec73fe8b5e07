"""The transformer_lm example against the same model and training in PyTorch, in one run.

Not part of the build or CI (nbit never depends on PyTorch). With torch installed:

    python tools/transformer_lm_vs_pytorch.py [--steps 300] [--batch-size 32] [--seq-len 64]
        [--precisions 32-true,64-true,bf16-mixed,bf16-true,16-true]

For each precision it runs `cargo run --release --example transformer_lm -- <precision> --json`
and the same configuration in PyTorch, each in its own process (peak RSS is per process), and
prints one table: validation loss, perplexity, tokens/s and peak RSS of both, with nbit/PyTorch
ratios. The PyTorch model is the one `nbit::demos::Transformer` trains: Lightning's demo
architecture (`lightning.pytorch.demos.Transformer`: an embedding scaled by sqrt(ninp), sinusoidal
positions with dropout, `nn.Transformer(batch_first=True)`, a linear decoder, log_softmax) with the
published positional encoding (`pe[:t]`) and every attention causal, fed the inputs and scored
on the next tokens, trained with AdamW (lr 1e-3). Same text (examples/data/jargon.txt.gz), same
character vocabulary, same windows (stride seq_len, seq_len + 1 ids), 5% held out.
"""
import argparse, gzip, json, math, os, random, resource, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(ROOT, 'examples', 'data', 'jargon.txt.gz')


def torch_run(precision, steps, batch_size, seq_len, threads):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    text = gzip.open(TEXT, 'rt', encoding='utf-8').read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    rows = (len(ids) - 1) // seq_len
    windows = torch.stack([ids[r * seq_len: r * seq_len + seq_len + 1] for r in range(rows)])
    order = list(range(rows))
    random.Random(0).shuffle(order)
    held = round(0.05 * rows)
    val, train = windows[order[:held]], windows[order[held:]]
    ninp, vocab = 200, len(chars)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab, ninp)
            self.drop = nn.Dropout(0.2)
            self.transformer = nn.Transformer(d_model=ninp, nhead=2, num_encoder_layers=2,
                                              num_decoder_layers=2, dim_feedforward=200,
                                              dropout=0.2, batch_first=True)
            self.decoder = nn.Linear(ninp, vocab)
            pe = torch.zeros(5000, ninp)
            pos = torch.arange(0, 5000, dtype=torch.float).unsqueeze(1)
            div = torch.exp(torch.arange(0, ninp, 2).float() * (-math.log(10000.0) / ninp))
            pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
            self.register_buffer('pe', pe)

        def forward(self, x):
            t = x.shape[1]
            h = self.drop(self.embedding(x) * math.sqrt(ninp) + self.pe[:t].to(self.decoder.weight.dtype))
            mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype)
            out = self.transformer(h, h, src_mask=mask, tgt_mask=mask, memory_mask=mask,
                                   src_is_causal=True, tgt_is_causal=True, memory_is_causal=True)
            return F.log_softmax(self.decoder(out), dim=-1).reshape(-1, vocab)

    model = LM()
    dtype = {'64-true': torch.float64, 'bf16-true': torch.bfloat16, '16-true': torch.float16}.get(precision)
    if dtype is not None:
        model = model.to(dtype)
    autocast = precision == 'bf16-mixed'
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    done, start = 0, time.perf_counter()
    while done < steps:
        perm = torch.randperm(len(train), generator=gen)
        for b in range(len(train) // batch_size):
            if done == steps:
                break
            w = train[perm[b * batch_size:(b + 1) * batch_size]]
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
                out = model(w[:, :-1])
                loss = F.nll_loss(out.float(), w[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    secs = time.perf_counter() - start
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        for b in range(0, len(val), 64):
            w = val[b:b + 64]
            out = model(w[:, :-1])
            total += F.nll_loss(out.float(), w[:, 1:].reshape(-1), reduction='sum').item()
            count += w[:, 1:].numel()
    loss = total / count
    return dict(precision=precision, val_loss=loss, val_perplexity=math.exp(loss),
                tokens_per_sec=steps * batch_size * seq_len / secs,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                torch=torch.__version__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=300)
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--seq-len', type=int, default=64)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--precisions', default='32-true,64-true,bf16-mixed,bf16-true,16-true')
    ap.add_argument('--one', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(torch_run(a.one, a.steps, a.batch_size, a.seq_len, a.threads)))
        return
    subprocess.run(['cargo', 'build', '--release', '--example', 'transformer_lm'], cwd=ROOT, check=True)
    env = dict(os.environ, NBIT_NUM_THREADS=str(a.threads))
    shape = ['--steps', str(a.steps), '--batch-size', str(a.batch_size), '--seq-len', str(a.seq_len)]
    rows = []
    for p in a.precisions.split(','):
        nbit = json.loads(subprocess.run(
            [os.path.join(ROOT, 'target', 'release', 'examples', 'transformer_lm'), p, '--json'] + shape,
            cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        torch = json.loads(subprocess.run(
            [sys.executable, __file__, '--one', p] + shape + ['--threads', str(a.threads)],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append((p, nbit, torch))
        print(f'{p}: nbit {nbit["tokens_per_sec"]:.0f} tok/s loss {nbit["val_loss"]:.4f}; '
              f'torch {torch["tokens_per_sec"]:.0f} tok/s loss {torch["val_loss"]:.4f}', flush=True)
    print(f'\nsteps {a.steps}, batch {a.batch_size} x {a.seq_len} tokens, {a.threads} threads, '
          f'torch {rows[0][2]["torch"]}')
    print('| precision | val loss nbit / torch | perplexity nbit / torch | tokens/s nbit / torch (ratio) '
          '| peak RSS MB nbit / torch (ratio) |')
    print('|---|---|---|---|---|')
    for p, n, t in rows:
        print(f'| {p} | {n["val_loss"]:.3f} / {t["val_loss"]:.3f} | {n["val_perplexity"]:.2f} / '
              f'{t["val_perplexity"]:.2f} | {n["tokens_per_sec"]:.0f} / {t["tokens_per_sec"]:.0f} '
              f'({n["tokens_per_sec"] / t["tokens_per_sec"]:.2f}) | {n["peak_rss_bytes"] / 1e6:.0f} / '
              f'{t["peak_rss_bytes"] / 1e6:.0f} ({n["peak_rss_bytes"] / t["peak_rss_bytes"]:.2f}) |')


if __name__ == '__main__':
    main()
