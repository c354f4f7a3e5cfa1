"""Data-parallel training across processes started by ``torchrun``.

Every process holds a full copy of each trainable role and the frozen teacher (the teacher is never
wrapped or synchronised: it has no gradients). After each role's backward pass the gradients of
that role are averaged across processes with one all-reduce over a flat buffer, which is what
``DistributedDataParallel`` computes; doing it explicitly keeps multi-role methods (critic and
student phases, frozen roles, aux heads) free of DDP's one-forward-per-backward rules. Backend:
gloo on CPU, nccl on CUDA. Only rank 0 writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size


def init(device: torch.device) -> None:
    if world()[2] > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not active():
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Makes every rank start from rank 0's weights."""
    if not active():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def gather(obj):
    """Every rank's ``obj`` as a list (just ``[obj]`` when not distributed)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def checksum(module: torch.nn.Module) -> str:
    """sha256 of a module's parameters and buffers: equal on every rank iff the replicas agree."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
