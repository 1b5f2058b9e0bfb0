"""Data-parallel training of an lstm_fused.LSTM on the "adding problem", one process per device.

    torchrun --nproc_per_node=N examples/train_ddp.py [--peephole] [--coupled] [--fsdp]
                                                      [--compile BACKEND] [--save model.pt]

With CUDA, each process drives GPU LOCAL_RANK and talks over NCCL; without it, processes run on
the CPU over gloo (so `torchrun --nproc_per_node=2 examples/train_ddp.py` works on a laptop).
--fsdp shards parameters with FSDP2 (torch.distributed.fsdp.fully_shard) instead of DDP.

Task: each sequence holds random values in [0, 1] and two markers; the target is the sum of
the two marked values. Predicting the mean gives MSE 1/6 ~ 0.167, so a loss well below that
means the LSTM learned to remember. The saved state_dict loads into a plain lstm_fused model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    import lstm_fused
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import lstm_fused


class Model(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.lstm = lstm_fused.LSTM(2, args.hidden, num_layers=args.layers, batch_first=True,
                                    dropout=args.dropout if args.layers > 1 else 0.0,
                                    peephole="diagonal" if args.peephole else None,
                                    coupled=args.coupled)
        self.head = nn.Linear(args.hidden, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1]).squeeze(-1)


def adding_problem(samples, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(samples, seq_len, generator=g)
    marks = torch.zeros(samples, seq_len)
    half = seq_len // 2
    first = torch.randint(0, half, (samples,), generator=g)
    second = torch.randint(half, seq_len, (samples,), generator=g)
    rows = torch.arange(samples)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    x = torch.stack([values, marks], dim=-1)  # [N, T, 2]
    y = (values * marks).sum(dim=1)  # [N]
    return TensorDataset(x, y)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--peephole", action="store_true", help='peephole="diagonal"')
    p.add_argument("--coupled", action="store_true", help="coupled input/forget gates (CIFG)")
    p.add_argument("--seq-len", type=int, default=20)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    p.add_argument("--compile", metavar="BACKEND", default=None,
                   help='torch.compile the wrapped model ("inductor", "aot_eager", ...)')
    p.add_argument("--save", metavar="PATH", default=None, help="state_dict saved by rank 0")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if "RANK" not in os.environ:  # plain `python train_ddp.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="29500")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # same initial parameters everywhere (FSDP2 needs it; DDP
    model = Model(args).to(device)  # broadcasts rank 0's anyway)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.lstm)
        fully_shard(model)
        wrapped = model
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
                      find_unused_parameters=False)
    forward = torch.compile(wrapped, backend=args.compile) if args.compile else wrapped
    opt = torch.optim.Adam(wrapped.parameters(), lr=args.lr)

    data = adding_problem(args.samples, args.seq_len, seed=1234)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    if rank == 0:
        print(f"{world} process(es), {backend} on {device.type}, "
              f"{'FSDP2' if args.fsdp else 'DDP'}"
              f"{f', torch.compile({args.compile})' if args.compile else ''}; "
              f"model: {model.lstm}; {args.batch_size} x {world} sequences per step", flush=True)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        wrapped.train()
        start = time.perf_counter()
        total = torch.zeros(2, device=device)  # (sum of losses, batches)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.mse_loss(forward(x), y)  # a batch mean: averaged gradients match
            opt.zero_grad(set_to_none=True)  # one big batch of batch_size x world
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach(), torch.ones((), device=device)])
        dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: train mse {(total[0] / total[1]).item():.4f}"
                  f"  ({time.perf_counter() - start:.1f}s)", flush=True)

    if args.save:
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(  # collective: every rank calls it
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = {k: v.cpu() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, args.save)
            print(f"saved {args.save}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
