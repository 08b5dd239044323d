"""
Run by tests/test_fsdp.py under torchrun (2 processes, gloo): FlatAdamW8bit on FSDP-style shards (DTensors split
on dim 0) against the one-process optimizer on the whole tensors, with the same gradients every step. A shard
that starts on a 256-element block boundary of its parameter is quantised in the same blocks as one process and
must match it bit for bit; one that starts off the grid is quantised in other blocks, and must stay within the
8-bit state's quantisation error. Prints one JSON line with both measurements.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optim  # noqa: E402

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
# rows of 1024: rank 1's shard of (4, 1024) starts at element 2048 (on the grid); rows of 1000: rank 1's shard of
# (5, 1000) starts at element 3000 (off it: 3000 % 256 = 184); both have >= 4096 elements, so 8-bit state
shapes = {"aligned": (4, 1024), "misaligned": (5, 1000)}
init = {k: torch.randn(s) for k, s in shapes.items()}
grads = [{k: torch.randn(s) for k, s in shapes.items()} for _ in range(5)]

whole = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
sharded = {k: torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for k, v in init.items()}
opt_whole = optim.configure_optimizer(whole.values(), "adamw8bit", lr=1e-2, weight_decay=0.1)
opt_shard = optim.configure_optimizer(sharded.values(), "adamw8bit", lr=1e-2, weight_decay=0.1)
for g in grads:
    for k in shapes:
        whole[k].grad.copy_(g[k])
        sharded[k].grad.to_local().copy_(distribute_tensor(g[k], mesh, [Shard(0)]).to_local())
    opt_whole.step()
    opt_shard.step()
out = {}
for k in shapes:
    got, want, start = sharded[k].full_tensor(), whole[k].detach(), init[k]
    out[k] = {"bitwise": bool(torch.equal(got, want)),
              "rel_update_diff": ((got - want).norm() / (want - start).norm()).item()}
if dist.get_rank() == 0:
    print(json.dumps(out))
dist.destroy_process_group()
