"""On a CUDA device: the forward never synchronises the host with the device (ids are checked where the
EngramInputs are built, on the host), and its logits equal the CPU model's. CI has no GPU; these run on the
device machine (see docs/architecture.md, "Checks on a GPU")."""

from __future__ import annotations

import pytest
import torch

from engramlm.models.decode import DecodeCache
from helpers import tiny_lm
from test_model import config, randint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@torch.no_grad()
def test_forward_and_decode_step_do_not_synchronise() -> None:
    cpu = tiny_lm(config(use_moe=False), random_conv=True).eval()
    gpu = tiny_lm(config(use_moe=False), random_conv=True).cuda().eval()
    ids = randint((2, 16))
    doc = torch.zeros(2, 16, dtype=torch.bool)
    doc[:, 0] = doc[0, 9] = True
    engram = gpu.engram_inputs(ids, doc)  # on the host: hashing and checks happen here
    x = ids.cuda()
    out = _no_sync(lambda: gpu(x, engram=engram))
    ref = cpu(ids, engram=cpu.engram_inputs(ids, doc))
    torch.testing.assert_close(out.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4)

    cache = DecodeCache(gpu, 2, 20)
    cache.run(gpu, ids[:, :15])
    step, nxt = cache.begin(ids[:, 15:]), ids[:, 15:].cuda()
    last = _no_sync(lambda: gpu(nxt, engram=step.engram, kv=cache.kv))
    cache.commit(step)
    torch.testing.assert_close(last.logits[:, -1].cpu(), cpu(ids).logits[:, -1], atol=1e-4, rtol=1e-4)


def _nccl_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from engramlm.dist.rows import RowShard, exchange_rows, shard_ranges

    torch.cuda.set_device(0)  # every rank on the one GPU of the device machine
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        table = torch.randn(101, 8, generator=torch.Generator().manual_seed(7)).cuda()
        shard = RowShard(shard_ranges(101, world), rank)
        leaf = shard.take(table).clone().requires_grad_(True)
        ids = torch.randint(0, 101, (6, 3), generator=torch.Generator().manual_seed(rank)).cuda()
        rows = exchange_rows(ids, shard, leaf)
        rows.sum().backward()
        save_file({"rows": rows.detach().cpu(), "ids": ids.cpu(), "grad": leaf.grad.cpu()}, f"{out_dir}/r{rank}.st")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_row_exchange_on_nccl(tmp_path) -> None:
    """The dist core on NCCL, 2 processes: rows equal plain indexing, gradients reach the owners summed.

    NCCL refuses two ranks on one device ("Duplicate GPU detected") unless the machine has 2 GPUs; on a
    one-GPU machine this test reports that refusal as the reason it cannot run."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    table = torch.randn(101, 8, generator=torch.Generator().manual_seed(7))
    grad = torch.zeros(101, 8)
    for r in range(2):
        got = load_file(f"{tmp_path}/r{r}.st")
        torch.testing.assert_close(got["rows"], table[got["ids"]], rtol=0, atol=0)
        grad.index_put_((got["ids"].flatten(),), torch.ones(got["ids"].numel(), 8), accumulate=True)
    held = torch.cat([load_file(f"{tmp_path}/r{r}.st")["grad"] for r in range(2)])
    torch.testing.assert_close(held, grad)
