"""One training step against HF transformers: engramlm's head-to-head arms and HF models of the same shape.

Why: issue 18 asks for training tokens/s and the fraction of the matmul rate for the head-to-head
configurations, measured against code nobody here wrote. The fair peer is the loop most people would
run: an HF ``LlamaForCausalLM`` (and a ``Qwen2MoeForCausalLM`` for the MoE arms) with the same
backbone shape, random init, ``torch.optim.AdamW`` with the same LR, betas, eps and weight decay
(decay on matrices only, as HF's Trainer groups them), the same global grad-norm clip, and HF's own
loss (``labels`` with ``shift_labels``: our already-shifted targets, so both score the same tokens).

Contenders (one process, interleaved per repeat in rotating order, every one on the same real SOTU
batch ``k`` at repeat ``k``, the batches built and hashed outside the timer as the loader does it
in the input pipeline):

* ``engramlm dense`` / ``moe`` / ``engram_moe``: ``Trainer.train_step`` on configs/sotu_*.toml with the
  paper's recipe (Muon for matrices, AdamW for the rest, sparse Adam for the Engram tables);
* ``engramlm dense adamw``: the dense arm with ``optim.use_muon=false``, the like-for-like row;
* ``hf llama``: ``LlamaForCausalLM`` of the dense arm's shape (d, layers, heads, MLP width, vocab,
  untied head, RMSNorm eps, RoPE theta);
* ``hf qwen2_moe`` (``--hf-moe on``): ``Qwen2MoeForCausalLM`` of the MoE arm's shape: layer 0 dense
  (its MLP width), then 16 routed experts of width 256, top 2, one shared expert of width 256, no
  q/k/v bias. Its matmuls match ours; it adds a ``d x 1`` shared-expert gate per layer and routes by
  softmax top-k (ours: the arm's router), neither of which moves the FLOPs.

A step is forward + backward + clip + optimizer step + zero_grad (+ our MoE routing-bias update);
the optimizer's time is timed inside it. The fraction of the matmul rate counts 6 P_act FLOPs per
token (P_act: activated parameters without the embedding and the LM head, as in bench_muon, each
model's own count) against the machine's best fp32 1024^3 matmul rate at that thread count;
``with_head`` also counts the LM head (6 (P_act + V d)). Attention's sequence term, the embedding
lookup, element-wise work and Muon's Newton-Schulz are left out, so the fraction is a lower bound.
The models train for real (losses fall), but with different recipes their trajectories differ;
only the time and the tokens are compared.

Run from the repository root: ``python -m benchmarks.bench_train_step`` (needs ``transformers``, the
``bench`` extra, and ``engramlm data prepare --source sotu --out runs/data/sotu``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import gemm_rate, paired_ratios, stats, write_result
from engramlm.models.accounting import count_parameters
from engramlm.train import Trainer, load_train_config
from engramlm.train.muon import MUON_NUMERICS_VERSION
from engramlm.train.schedule import lr_multiplier

# Bumped whenever what a step contains changes, so old and new results never mix.
BENCH_VERSION = 3  # 2: the ratio without the optimizer, raw optimizer seconds; 3: Muon's one-process chunked step

ARMS = {  # name -> (config, extra overrides)
    "engramlm dense": ("configs/sotu_dense.toml", []),
    "engramlm dense adamw": ("configs/sotu_dense.toml", ["optim.use_muon=false"]),
    "engramlm moe": ("configs/sotu_moe.toml", []),
    "engramlm engram_moe": ("configs/sotu_engram_moe.toml", []),
}
HF_PEER = {  # our arm -> the HF contender it is paired with
    "engramlm dense": "hf llama",
    "engramlm dense adamw": "hf llama",
    "engramlm moe": "hf qwen2_moe",
    "engramlm engram_moe": "hf qwen2_moe",
}


class Contender:
    """One model and its optimizer; ``step(batch)`` trains on it and records time, optimizer time, loss."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.step_s: list[float] = []
        self.optim_s: list[float] = []
        self.losses: list[float] = []
        self.token_sums: list[int] = []  # a checksum of the tokens each step saw
        self.p_act = 0
        self.head = 0

    def record(self, batch: dict[str, Any], dt: float, opt_dt: float, loss: float) -> None:
        self.step_s.append(dt)
        self.optim_s.append(opt_dt)
        self.losses.append(loss)
        self.token_sums.append(int((batch["input_ids"].long() * 1_000_003 + batch["targets"].long()).sum()))


class Ours(Contender):
    """``Trainer.train_step`` as it is, with ``optim.step`` wrapped by a timer."""

    def __init__(self, name: str, config: str, overrides: list[str]) -> None:
        super().__init__(name)
        self.trainer = Trainer(load_train_config(config, overrides))
        opt = self.trainer.optim
        inner = opt.step
        self._opt_dt = 0.0

        def timed() -> bool:
            t0 = time.perf_counter()
            out = inner()
            self._opt_dt = time.perf_counter() - t0
            return out

        opt.step = timed  # type: ignore[method-assign]
        mc = self.trainer.model_config
        self.p_act = count_parameters(mc).p_act
        self.head = mc.vocab_size * mc.hidden_size
        self.batches: dict[int, dict[str, Any]] = {}

    def prepare(self, k: int) -> dict[str, Any]:
        """Batch ``k`` with its row ids hashed (the loader's input pipeline), outside any timer."""
        self.batches[k] = self.trainer.loader.batch_at(k)
        return self.batches[k]

    def step(self, k: int) -> None:
        batch = self.batches.pop(k)
        t0 = time.perf_counter()
        rec = self.trainer.train_step(batch)
        self.record(batch, time.perf_counter() - t0, self._opt_dt, rec["loss"])

    def close(self) -> None:
        self.trainer.close()


class HF(Contender):
    """An HF causal LM trained the way HF's Trainer steps it: loss, backward, clip, AdamW, zero_grad."""

    def __init__(self, name: str, model: torch.nn.Module, trainer: Trainer) -> None:
        super().__init__(name)
        self.model = model.train()
        self.cfg = trainer.config
        o = self.cfg.optim
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.params = params
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
        )
        self.k = 0
        self.p_act, self.head = hf_p_act(model)

    def step(self, k: int, batch: dict[str, Any]) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        targets = batch["targets"].masked_fill(~batch["loss_mask"], -100)
        out = self.model(input_ids=batch["input_ids"], labels=targets, shift_labels=targets)
        out.loss.backward()
        if cfg.optim.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.clip)
        mult = lr_multiplier(k, cfg.total_steps, cfg.schedule)
        for g in self.opt.param_groups:
            g["lr"] = cfg.optim.lr * mult
        t1 = time.perf_counter()
        self.opt.step()
        opt_dt = time.perf_counter() - t1
        self.opt.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        self.record(batch, time.perf_counter() - t0, opt_dt, loss)


def hf_p_act(model: torch.nn.Module) -> tuple[int, int]:
    """(activated parameters without embedding and LM head, LM head size) of an HF causal LM: routed
    experts count ``top_k / n_experts`` of their weights."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = 0
    for name, p in model.named_parameters():
        if p is embed or p is head:
            continue
        if ".experts." in name:
            total += p.numel() * cfg.num_experts_per_tok // cfg.num_experts
        else:
            total += p.numel()
    return total, head.numel()


def hf_llama(trainer: Trainer) -> torch.nn.Module:
    """bench_decode's same-shape Llama (random init), with the arm's RMSNorm eps."""
    from benchmarks.bench_decode import hf_llama as build

    model = build(trainer.model)
    model.config.rms_norm_eps = trainer.model_config.norm_eps
    for m in model.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = trainer.model_config.norm_eps
    return model


def hf_qwen2_moe(trainer: Trainer) -> torch.nn.Module:
    """A Qwen2MoeForCausalLM of the MoE arm's shape (see the module docstring for what differs)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from benchmarks.bench_decode import hf_backbone_shape

    c = trainer.model_config
    m = c.moe
    if m is None or m.n_shared > 1:
        raise SystemExit(f"hf qwen2_moe needs a MoE arm with at most one shared expert; got {m}")
    cfg = Qwen2MoeConfig(
        **hf_backbone_shape(c),
        moe_intermediate_size=m.expert_hidden,
        shared_expert_intermediate_size=m.expert_hidden * m.n_shared,
        num_experts=m.n_routed,
        num_experts_per_tok=m.top_k,
        mlp_only_layers=list(range(m.n_dense_layers)),
        decoder_sparse_step=1,
        qkv_bias=False,
        norm_topk_prob=True,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        max_position_embeddings=4096,
        tie_word_embeddings=c.tie_embeddings,
    )
    torch.manual_seed(2)
    return Qwen2MoeForCausalLM(cfg)


def run(args: argparse.Namespace, threads: int, tmp: Path) -> dict[str, Any]:
    """Build every contender, time ``warmup + repeats`` interleaved steps at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    base = [f"data.dir={args.data}", "progress=false", "tensorboard=false", f"threads={threads}", *args.set]
    ours = {n: Ours(n, cfg, [*base, f"out_dir={tmp / f't{threads}' / n.replace(' ', '_')}", *extra])
            for n, (cfg, extra) in ARMS.items() if n in args.arms}  # fmt: skip
    dense = ours.get("engramlm dense") or next(iter(ours.values()))
    for n, c in ours.items():
        if ("moe" in n) != (c.trainer.model_config.moe is not None):
            raise SystemExit(f"{n}: --set changed whether the arm has a MoE section (set moe keys per arm config)")
    theirs: dict[str, HF] = {}
    if "engramlm dense" in ours or "engramlm dense adamw" in ours:
        ref = ours.get("engramlm dense") or ours["engramlm dense adamw"]
        theirs["hf llama"] = HF("hf llama", hf_llama(ref.trainer), ref.trainer)
    moe = ours.get("engramlm moe")
    if args.hf_moe == "on" and moe is not None:
        theirs["hf qwen2_moe"] = HF("hf qwen2_moe", hf_qwen2_moe(moe.trainer), moe.trainer)
    tokens = dense.trainer.config.tokens_per_step
    for c in ours.values():
        if c.trainer.config.tokens_per_step != tokens:
            raise SystemExit(f"{c.name}: {c.trainer.config.tokens_per_step} tokens per step, {dense.name}: {tokens}")
    names = [*ours, *theirs]
    steps = args.warmup + args.repeats
    from tqdm import tqdm

    for k in tqdm(range(steps), desc=f"{threads} thread(s)", leave=False):
        batch = {n: c.prepare(k) for n, c in ours.items()}
        first = batch[dense.name]
        for n, b in batch.items():  # every contender sees the same tokens (the loaders are the same function)
            if not torch.equal(b["input_ids"], first["input_ids"]):
                raise AssertionError(f"{n}: batch {k} differs from {dense.name}'s")
        shift = k % len(names)
        for n in names[shift:] + names[:shift]:
            if n in ours:
                ours[n].step(k)
            else:
                theirs[n].step(k, first)
    rate = max(gemm_rate(threads), gemm_rate(threads))
    contenders: dict[str, Contender] = {**ours, **theirs}
    w = args.warmup
    out: dict[str, Any] = {"threads": threads, "gemm_fp32_flops_per_s": rate, "tokens_per_step": tokens, "arms": {}}
    for n, c in contenders.items():
        step_s, opt_s = c.step_s[w:], c.optim_s[w:]
        med = stats(step_s)["median"]
        a = {
            "step_s": stats(step_s),
            "tokens_per_s": stats([tokens / s for s in step_s]),
            "optimizer_s": stats(opt_s),
            "optimizer_share": stats([o / s for o, s in zip(opt_s, step_s, strict=True)]),
            "p_act": c.p_act,
            "lm_head_params": c.head,
            "matmul_rate_fraction": 6 * c.p_act * tokens / med / rate,
            "matmul_rate_fraction_with_head": 6 * (c.p_act + c.head) * tokens / med / rate,
            "losses": c.losses,
            "token_checksums": c.token_sums,
            "raw_step_s": step_s,
            "raw_optimizer_s": opt_s,
        }
        peer = HF_PEER.get(n)
        if peer in theirs:
            hf = theirs[peer]
            a["hf_peer"] = peer
            a["speedup_vs_hf"] = stats(paired_ratios(hf.step_s[w:], step_s))
            # the rest of the step (forward, backward, clip, zero_grad): where the gap is when it is not the optimizer
            rest_hf = [s - o for s, o in zip(hf.step_s[w:], hf.optim_s[w:], strict=True)]
            a["speedup_vs_hf_without_optimizer"] = stats(
                paired_ratios(rest_hf, [s - o for s, o in zip(step_s, opt_s, strict=True)])
            )
        out["arms"][n] = a
    if isinstance(theirs.get("hf llama"), HF):
        out["hf_attn_implementation"] = theirs["hf llama"].model.config._attn_implementation
    if "hf qwen2_moe" in theirs:
        out["hf_experts_implementation"] = getattr(theirs["hf qwen2_moe"].model.config, "_experts_implementation", None)
    out["model"] = shape(dense.trainer, moe.trainer if moe is not None else None)
    for c in ours.values():
        c.close()
    return out


def shape(dense: Trainer, moe: Trainer | None) -> dict[str, Any]:
    """The backbone shape every contender shares (for the README table)."""
    c = dense.model_config
    out: dict[str, Any] = {"hidden": c.hidden_size, "layers": c.num_layers, "heads": c.n_heads,
                           "mlp_hidden": c.mlp_hidden, "vocab": c.vocab_size, "moe": None}  # fmt: skip
    if moe is not None and moe.model_config.moe is not None:
        m = moe.model_config.moe
        out["moe"] = {"n_routed": m.n_routed, "n_shared": m.n_shared, "top_k": m.top_k,
                      "expert_hidden": m.expert_hidden, "n_dense_layers": m.n_dense_layers}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/data/sotu", help="prepared corpus (engramlm data prepare)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--hf-moe", choices=["on", "off"], default="on", help="add the Qwen2-MoE peer of the MoE arm")
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every arm (tests: a tiny model)")  # fmt: skip
    ap.add_argument("--out", default="train_step")
    ap.add_argument("--label", default=None, help="a note shown in the README table's title")
    ap.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    runs = [run(args, t, tmp) for t in args.threads]
    import transformers

    payload = {
        "version": BENCH_VERSION,
        "label": args.label,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "transformers": transformers.__version__,
        "muon_numerics_version": MUON_NUMERICS_VERSION,
        "flops": "6 P_act per token (P_act without embedding and LM head; with_head adds V d); vs best fp32 "
        "1024^3 matmul",
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "model": runs[0].pop("model"),
        "runs": runs,
    }
    for r in runs[1:]:
        r.pop("model")
    path = write_result(args.out, payload, args.results_dir)
    for r in runs:
        print(f"{r['threads']} thread(s), {r['tokens_per_step']} tokens/step, "
              f"fp32 matmul {r['gemm_fp32_flops_per_s'] / 1e9:.1f} GFLOP/s")  # fmt: skip
        for n, a in r["arms"].items():
            sp = a.get("speedup_vs_hf")
            vs = f", {sp['median']:.2f}x {a['hf_peer']} (IQR {sp['q1']:.2f}-{sp['q3']:.2f})" if sp else ""
            print(f"  {n}: step {a['step_s']['median']:.3f} s, {a['tokens_per_s']['median']:,.0f} tok/s, "
                  f"optimizer {a['optimizer_share']['median']:.0%}, "
                  f"{a['matmul_rate_fraction']:.0%} of matmul rate{vs}")  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
