"""Baseline (c): a plain torch DDP loop (gloo), backbone replicated on every rank (issue 8).

    torchrun --nproc_per_node 2 bench/baselines/ddp_loop.py [--steps 40]

The module holds the prompt Parameter and the frozen backbone; DistributedDataParallel reduces
only the prompt's gradient (frozen parameters are not registered with its reducer). Each rank
takes its own micro batch of 8 (strided slice of a seeded permutation, like DistributedSampler).
Clip 1.0 + AdamW lr 0.3 (constant). Timed on rank 0 after a barrier, so the step time is the
slowest rank's; final_loss is the mean over ranks of the last step's loss.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from bench.baselines import _workload as W


class PromptedT5(nn.Module):
    """Frozen T5 + a trainable r x d prompt prepended to the encoder input embeddings."""

    def __init__(self, backbone: nn.Module, p_init: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = nn.Parameter(p_init)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        x = torch.cat([self.prompt.unsqueeze(0).expand(b, -1, -1),
                       self.backbone.get_input_embeddings()(input_ids)], dim=1)
        m = torch.cat([attention_mask.new_ones(b, self.prompt.shape[0]), attention_mask], dim=1)
        return self.backbone(inputs_embeds=x, attention_mask=m, labels=labels).loss


def main() -> None:
    args = W.parse_args(__doc__)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    if rank == 0:  # builds the model files if missing; the other ranks must not race on them
        mdir = W.model_dir()
    dist.barrier()
    mdir = W.model_dir()
    data = W.load_tensors(W.data_dir(args.data_dir), mdir)
    backbone = W.load_backbone(mdir)
    model = PromptedT5(backbone, W.init_prompt(backbone.get_input_embeddings().weight, args.seed))
    model.train()
    ddp = DDP(model)  # CPU: no device_ids; the first forward/backward builds the reducer's buckets
    opt = torch.optim.AdamW([model.prompt], lr=W.LR, weight_decay=W.WEIGHT_DECAY)

    batches = W.batch_indices(len(data["labels"]), args.seed, rank, world)
    step_s: list[float] = []
    loss = torch.zeros(())
    for _ in range(args.steps):
        idx = next(batches)
        ids, mask, labels = (data[k][idx] for k in ("input_ids", "attention_mask", "labels"))
        dist.barrier()  # start every step together so rank 0's clock measures the slowest rank
        t0 = time.perf_counter()
        loss = ddp(ids, mask, labels)
        loss.backward()  # DDP all-reduces (averages) the prompt gradient here
        nn.utils.clip_grad_norm_([model.prompt], W.MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    final = loss.detach().clone()
    dist.all_reduce(final)
    if rank == 0:
        W.report("ddp_loop", world, step_s, final.item() / world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
