"""Baseline (a): a plain single-process PyTorch loop over the standard workload (issue 8).

    python bench/baselines/plain_loop.py [--steps 40] [--threads N]

One process on all cores (torch's default intra-op threads unless --threads). The prompt is an
nn.Parameter prepended to the encoder's input embeddings; clip 1.0 + AdamW (lr 0.3, constant: no
schedule, which does not change the step cost). Timed: forward + backward + clip + step + zero_grad.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bench.baselines import _workload as W


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def main() -> None:
    args = W.parse_args(__doc__, _extra)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    mdir = W.model_dir()
    data = W.load_tensors(W.data_dir(args.data_dir), mdir)
    model = W.load_backbone(mdir)
    model.train()  # as a trainer would; the standard T5 has dropout 0 anyway
    embed = model.get_input_embeddings()
    prompt = nn.Parameter(W.init_prompt(embed.weight, args.seed))
    opt = torch.optim.AdamW([prompt], lr=W.LR, weight_decay=W.WEIGHT_DECAY)

    batches = W.batch_indices(len(data["labels"]), args.seed)
    step_s: list[float] = []
    loss = torch.zeros(())
    for _ in range(args.steps):
        idx = next(batches)
        ids, mask, labels = (data[k][idx] for k in ("input_ids", "attention_mask", "labels"))
        t0 = time.perf_counter()
        b = ids.shape[0]
        x = torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embed(ids)], dim=1)
        m = torch.cat([mask.new_ones(b, W.NUM_TOKENS), mask], dim=1)
        loss = model(inputs_embeds=x, attention_mask=m, labels=labels).loss
        loss.backward()
        nn.utils.clip_grad_norm_([prompt], W.MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    W.report("plain_loop", 1, step_s, loss.item(), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
