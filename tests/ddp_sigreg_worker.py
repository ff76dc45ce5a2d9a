"""Run by test_sigreg.py under torchrun: each rank scores half the batch through a DDP-wrapped layer,
then one sample of it (rank r takes sample r).

argv: output folder, then "autograd" or "no-autograd". "no-autograd" makes the functional all-reduce
return a tensor without a gradient path, as torch before PyTorch PR 168140 did (issue 152127)."""
import os
import sys
import time

import torch
import torch.distributed as dist

import sigreg


def make_problem():
    """A layer and a batch of 2 views x 64 samples, identical in every process."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    x = torch.randn(2, 64, 6) * torch.tensor([2.0, 1.0, 0.5, 1.0, 1.0, 3.0]) + 0.5
    return model, x


if __name__ == "__main__":
    if sys.argv[2] == "no-autograd":
        real_all_reduce = sigreg.funcol.all_reduce
        sigreg.funcol.all_reduce = lambda x, op, group: sigreg.funcol.wait_tensor(real_all_reduce(x, op, group)).detach()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x = make_problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mine = x.chunk(world, dim=1)[rank]  # (V, N / world, D)
    loss_fn = sigreg.SIGReg(num_slices=64, seed=5)
    compiled = torch.compile(loss_fn, backend="aot_eager")  # traced by dynamo: the all-reduce must survive it
    steps = []
    for fn in (loss_fn, loss_fn, compiled):
        ddp.zero_grad()
        loss = fn(ddp(mine))
        loss.backward()  # DDP averages the gradients over ranks
        steps.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    slices = loss_fn.slices(5, torch.device("cpu"))
    ddp.zero_grad()  # one sample per rank (rank r takes sample r): N >= 2 holds for the global batch only
    loss = sigreg.SIGReg(num_slices=64, seed=5)(ddp(x[:, rank:rank + 1]))  # (V, 1, D)
    loss.backward()
    one_sample = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.save({"steps": steps, "slices": slices, "one_sample": one_sample},
               os.path.join(sys.argv[1], f"rank{rank}.pt"))
    dist.barrier()
    time.sleep(0.1)  # as minimal_vit_inet.close_distributed: gloo's threads release their work (else an abort)
    dist.destroy_process_group()
