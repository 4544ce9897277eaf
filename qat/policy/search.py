"""The MSE clip search of a run's start, split over its processes and run on their devices.

``scale_init: mse`` searches, per group of every quantized layer, the clip ratio that minimises
the quantization error (``qat.quant.grid.mse_clip_ratio``): 20 fake-quant passes over every
weight, 1.3 s per 2048 x 2048 matrix on one CPU core (over half an hour at 7B). ``clip_ratios`` deals the layers out: layer i is searched by
process ``i % world`` on its accelerator, and every process receives every ratio. Where only the
main process holds the weights (FSDP2 loads the model once; the other processes hold its
structure on the meta device), it sends each layer to the process that searches it. The result
is what each layer's own search returns (``QATLinear._init_qparams``), on the same device type.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..quant.apply import planned_weight
from ..quant.grid import mse_clip_ratio
from ..quant.scheme import QuantScheme


def ratio_shape(weight_shape: torch.Size, scheme: QuantScheme) -> tuple[int, ...]:
    """The shape of a layer's clip ratio: one per group, ``[..., out, n_groups]``."""
    *lead, in_features = weight_shape
    return (*lead, in_features // (scheme.group_size or in_features))


def search_one(w: Tensor, scheme: QuantScheme) -> Tensor:
    s = scheme
    return mse_clip_ratio(w.detach().float(), s.bits, s.group_size, s.symmetric, seq=s.seq)


@torch.no_grad()
def clip_ratios(model: nn.Module, plan: dict[str, QuantScheme], accelerator=None, progress: bool = False) -> dict[str, Tensor]:
    """``{layer: clip ratio}`` (CPU, float32) of the ``scale_init: mse`` layers of ``plan``
    (``{name: scheme}``, as ``quantize_model`` will wrap them), on every process. ``model``:
    the unwrapped student, its weights real on the main process at least."""
    from tqdm.auto import tqdm

    names = [n for n, s in plan.items() if s.scale_init == "mse"]
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    if world == 1:
        bar = tqdm(names, desc="clip search", disable=not progress, dynamic_ncols=True)
        return {n: search_one(planned_weight(model, n).to(device), plan[n]).cpu() for n in bar}
    import torch.distributed as dist

    real = torch.tensor([0.0 if any(planned_weight(model, n).is_meta for n in names) else 1.0], device=device)
    dist.all_reduce(real, op=dist.ReduceOp.MIN)  # DDP: every replica is real; FSDP2: the main one only
    everyone_has = bool(real.item())
    out: dict[str, Tensor] = {}
    rounds = range(0, len(names), world)
    for start in tqdm(rounds, desc="clip search", disable=not (progress and rank == 0), dynamic_ncols=True):
        batch = names[start : start + world]
        mine = None
        for owner, name in enumerate(batch):  # each layer of the round to the process that searches it
            w = planned_weight(model, name)
            if everyone_has or owner == 0:
                mine = w.detach().to(device) if owner == rank else mine
                continue
            buf = w.detach().to(device) if rank == 0 else torch.empty(w.shape, dtype=w.dtype, device=device)
            dist.broadcast(buf, src=0)
            mine = buf if owner == rank else mine
        found = search_one(mine, plan[batch[rank]]) if mine is not None else None
        for owner, name in enumerate(batch):  # every ratio to every process
            buf = found if owner == rank else torch.empty(ratio_shape(planned_weight(model, name).shape, plan[name]), device=device)
            dist.broadcast(buf, src=owner)
            out[name] = buf.cpu()
    return out
