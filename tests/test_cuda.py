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
