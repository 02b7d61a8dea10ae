"""What a training step keeps for backward: the bytes autograd saves in a ResNet-50 forward,
torch's nn.BatchNorm2d + ReLU vs bnkernels fused (convert_batchnorm(fuse=True)).

    python bench/saved_memory.py [--batch 8] [--size 224] [--device cpu] [--out DIR]

Counted with torch.autograd.graph.saved_tensors_hooks, each storage once (parameters
excluded): the activation memory a step holds at the end of its forward, which is what
sets the peak of a training step. It needs no GPU (the saved tensors are the same on any
device); on a GPU, bench_train.py measures the peak itself. Rows go to DIR/saved_memory.csv.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bnkernels  # noqa: E402
import common  # noqa: E402
from models import resnet50  # noqa: E402

COLUMNS = ["model", "variant", "batch", "size", "dtype", "saved_mb", "device", "torch",
           "commit"]


def saved_bytes(model, x) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            model(x)
    return sum(storages.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    base, name = resnet50()
    base = base.to(args.device).to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    meta = dict(model=name, batch=args.batch, size=args.size, dtype="bfloat16 autocast",
                device=common.device_name(args.device), torch=torch.__version__,
                commit=common.commit())
    with common.csv_rows(common.results_path(args.out, args.device, "saved_memory.csv"),
                         COLUMNS) as emit:
        for variant in ("torch_batchnorm", "bnkernels", "bnkernels_fused"):
            model = copy.deepcopy(base)
            if variant != "torch_batchnorm":
                model = bnkernels.convert_batchnorm(model, fuse=variant == "bnkernels_fused")
            mb = saved_bytes(model, x) / 2**20
            emit(dict(variant=variant, saved_mb=mb, **meta))
            print(f"{variant}: {mb:.1f} MiB saved for backward", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
