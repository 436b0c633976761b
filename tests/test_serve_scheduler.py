"""Continuous batching is invisible: alone, in a batch of 8 mixed lengths, or joining a running batch,
a request gets the greedy tokens of ``Engine.generate`` and the log-probabilities of one full forward."""

from __future__ import annotations

import pytest
import torch

from engramlm.hashing.spec import HashSpec
from engramlm.infer import Engine, SamplingParams
from engramlm.infer.tables import model_tables
from engramlm.models.config import EngramConfig, ModelConfig, MoEConfig
from engramlm.models.model import EngramLM
from engramlm.serve import Event, QueueFull, Request, Scheduler
from helpers import tiny_lm

V = 64
PROMPTS = [
    [5, 9, 3, 3, 17, 40, 2],
    [11, 4],
    [7, 7, 8, 1, 30, 29, 28, 60, 12, 13, 14],
    [50],
    [3, 3, 3, 3, 3, 3],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33],
    [1, 2],
    [63, 0, 63, 0, 9],
]
MAX_NEW = [12, 5, 9, 12, 1, 7, 12, 3]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> EngramLM:
    spec = HashSpec(max_ngram_size=3, n_head_per_ngram=2, engram_vocab_size=(101, 103), layer_ids=(0, 2))
    cfg = ModelConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=3,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=48,
        hc_mult=2,
        max_seq_len=64,
        moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, expert_hidden=16, n_dense_layers=1),
        engram=EngramConfig(hash=spec, head_dim=8),
    )
    model = tiny_lm(cfg, 0, random_conv=True).eval()
    with torch.no_grad():
        for blk in model.engram_layers.values():
            blk.embed.weight.mul_(3.0)  # make the rows matter for the argmax
    return model


@pytest.fixture(scope="module")
def reference(model: EngramLM) -> list[list[int]]:
    """What ``engramlm generate`` computes: Engine.generate, one prompt at a time."""
    with Engine(model) as eng:
        return [
            eng.generate([p], SamplingParams(max_new_tokens=m)).tokens[0] for p, m in zip(PROMPTS, MAX_NEW, strict=True)
        ]


class Collect:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    @property
    def tokens(self) -> list[int]:
        return [e.token for e in self.events if e.token is not None and e.finish != "stop"]

    @property
    def logprobs(self) -> list[float]:
        return [e.logprob for e in self.events if e.token is not None and e.finish != "stop"]

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish if self.events else None


def requests(idx: list[int], *, logprobs: int | None = 2) -> list[tuple[Request, Collect]]:
    out = []
    for i in idx:
        c = Collect()
        out.append((Request(PROMPTS[i], MAX_NEW[i], logprobs=logprobs, echo_logprobs=True, on_event=c), c))
    return out


def run_all(s: Scheduler, limit: int = 200) -> None:
    for _ in range(limit):
        if not s.running and not s.waiting:
            return
        s.step()
    raise AssertionError("the scheduler did not finish")


def full_forward_logprobs(model: EngramLM, seq: list[int]) -> torch.Tensor:
    """log p(seq[t+1] | seq[:t+1]) from one full forward (decode parity makes this the reference)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, :, :V].float(), -1)
    return lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]


def check(model: EngramLM, i: int, c: Collect, want: list[int]) -> None:
    assert c.tokens == want, f"prompt {i}"
    assert c.finish == "length"
    ref = full_forward_logprobs(model, PROMPTS[i] + want)
    n = len(PROMPTS[i])
    got_prompt = c.events[0].prompt_logprobs
    assert got_prompt[0] is None
    torch.testing.assert_close(torch.tensor(got_prompt[1:]), ref[: n - 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(c.logprobs), ref[n - 1 :], atol=1e-4, rtol=1e-4)


def test_alone_equals_generate(model: EngramLM, reference: list[list[int]]) -> None:
    with Engine(model) as eng:
        s = Scheduler(eng, max_batch=4)
        for i in range(len(PROMPTS)):
            ((req, c),) = requests([i])
            s.submit([req])
            run_all(s)
            check(model, i, c, reference[i])


def test_batch_of_eight_mixed_lengths(model: EngramLM, reference: list[list[int]]) -> None:
    with Engine(model) as eng:
        s = Scheduler(eng, max_batch=8)
        pairs = requests(list(range(8)))
        s.submit([r for r, _ in pairs])
        s.step()
        assert s.batch_size == 7  # one prefill of all eight; MAX_NEW[4] = 1 finished in the prefill
        run_all(s)
        for i, (_, c) in enumerate(pairs):
            check(model, i, c, reference[i])
        assert s.batch_size == 0


def test_joining_a_running_batch_through_the_prefetcher(model: EngramLM, reference: list[list[int]]) -> None:
    """Requests join at different steps, retire in between (slots compacted), rows come from a table tier;
    a small prefill budget spreads the admissions over several steps; max_batch 3 makes some wait."""
    with Engine(model, model_tables(model)) as eng:
        s = Scheduler(eng, max_batch=3, prefill_tokens=8)
        first = requests([0, 1])
        s.submit([r for r, _ in first])
        s.step()
        s.step()
        later = requests([2, 3, 5, 6, 7])
        s.submit([r for r, _ in later])
        seen = set()
        for _ in range(100):
            if not s.running and not s.waiting:
                break
            s.step()
            seen.add(s.batch_size)
            assert s.batch_size <= 3
        assert 3 in seen
        for i, (_, c) in zip([0, 1, 2, 3, 5, 6, 7], first + later, strict=True):
            check(model, i, c, reference[i])


def test_cancel_frees_the_slot_and_queue_is_bounded(model: EngramLM, reference: list[list[int]]) -> None:
    with Engine(model) as eng:
        s = Scheduler(eng, max_batch=2, max_queue=2)
        pairs = requests([0, 3])
        s.submit([r for r, _ in pairs])
        with pytest.raises(QueueFull):
            s.submit([requests([1])[0][0]])
        s.step()
        s.step()
        assert s.batch_size == 2
        s.cancel(pairs[0][0])
        s.step()
        assert s.batch_size == 1 and pairs[0][1].finish == "cancelled"
        run_all(s)
        check(model, 3, pairs[1][1], reference[3])


def test_sampled_request_is_reproducible_in_any_batch(model: EngramLM) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    with Engine(model) as eng:
        s = Scheduler(eng, max_batch=4)
        alone = Collect()
        s.submit([Request(PROMPTS[0], 10, params, on_event=alone)])
        run_all(s)
        shared = Collect()
        s.submit([r for r, _ in requests([2, 5])])
        s.step()
        s.submit([Request(PROMPTS[0], 10, params, on_event=shared)])
        run_all(s)
    assert alone.tokens == shared.tokens and len(alone.tokens) == 10
