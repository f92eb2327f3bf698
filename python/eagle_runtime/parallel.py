"""Tensor parallelism of the target over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs), launched by torchrun.

Megatron-style sharding of the target, built from the lean modules without touching their internals:

- q/k/v and gate/up are column-parallel: each rank loads the rows of its own heads / intermediate slice, and the
  modules are built with LOCAL head counts and intermediate size (so a later q/k/v or gate/up fusion of the
  local shards is still correct). KV heads are split across ranks; when there are fewer KV heads than ranks each
  rank keeps the one KV head its query heads read (replicated, as vLLM and SGLang do).
- o_proj and down_proj are row-parallel: :class:`RowParallelLinear` all-reduces its partial sums (bias added once,
  after the reduce). That is two all-reduces per layer, ``T * hidden`` elements each.
- Mixtral: every expert is sharded along its intermediate dimension (w1/w3 rows, w2 columns), router replicated,
  and the MoE block's output is all-reduced once. Why not one expert per rank: top-2 routing of a batch or tree
  puts an uneven number of tokens on each expert, so the rank holding the busiest experts sets the step time,
  and 8 experts do not split over 3, 5, 6 ... ranks; sharding each expert keeps every rank's work equal, works
  for any rank count that divides the intermediate size, and costs the same one all-reduce per layer.
- embedding and lm_head: ``vocab="replicated"`` (the default) keeps both whole on every rank; ``vocab="parallel"``
  splits their rows (:class:`VocabParallelEmbedding`: masked lookup + all-reduce; :class:`VocabParallelLMHead`:
  local logits + all-gather). Replicated is the default because the draft head reads the target's embedding and
  lm_head at every draft step: replicated, drafting needs no collective at all (the head itself is replicated),
  at the price of ``2 * V * H`` weights per rank (0.5 GB for Llama-2-70B in bf16, 2 GB for Llama-3's vocab).

Every rank drafts the same tree, verifies it over its shard and accepts the same tokens: all-reduce and
all-gather leave bit-identical tensors on every rank, and the acceptance RNG is a counter hash of (seed, offset),
so identical logits give identical draws. ``EAGLE_TP_DEBUG=1`` all-gathers the sampled / accepted tokens after
every step and raises if any rank disagrees.

Loading reads only each rank's slices (``safetensors.safe_open(...).get_slice``), single file or sharded with an
index; ``.bin`` checkpoints are refused since they cannot be sliced without unpickling everything.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig
from .loading import CheckpointError, index_shards, resolve_dir, target_from_state_dict

DEBUG_ENV = "EAGLE_TP_DEBUG"
_owned_group = False  # whether init_distributed created the default group (and shutdown_distributed may end it)


# ----------------------------------------------------------------------------------------------------------------
# process group
def env_world_size() -> int:
    """The torchrun world size (``WORLD_SIZE``), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | torch.device = "cpu") -> None:
    """Join torchrun's process group if not yet joined: NCCL for CUDA devices, gloo otherwise."""
    global _owned_group
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "tensor parallelism needs a torch.distributed process group: launch with "
            "`torchrun --nproc-per-node N ...` (or call torch.distributed.init_process_group first)"
        )
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    _owned_group = True


def resolve_tensor_parallel(tensor_parallel: int | None) -> int:
    """``tensor_parallel`` when given, else the running process group's size, else torchrun's, else 1."""
    if tensor_parallel is not None:
        if tensor_parallel < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
        return tensor_parallel
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` without an index means this rank's GPU (``LOCAL_RANK``)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def end_process_group() -> None:
    """A barrier, then destroy the default process group.

    The barrier matters at process exit: a gloo worker thread drops its finished collective (whose tensors Python
    references) only once it holds the GIL. If the main thread runs on to interpreter shutdown first, that thread
    is killed while it waits for the GIL and the process aborts ("terminate called without an active exception",
    exit -6; seen on 2 CPU cores, about 1 run in 10). Waiting in the barrier releases the GIL, so every earlier
    collective is released before we go on; the barrier's own work holds no Python tensors."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shutdown_distributed() -> None:
    """End the default process group (:func:`end_process_group`) if :func:`init_distributed` created it (end of a
    torchrun CLI run); a group the caller created is the caller's to end."""
    global _owned_group
    if _owned_group:
        end_process_group()
    _owned_group = False


def is_main_process() -> bool:
    """Rank 0, or no process group: the process that prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TPGroup:
    """The tensor-parallel group and its collectives, which count the bytes they move (per call, host side).

    The counters are plain Python ints: inside a captured CUDA graph they count the capture only.
    """

    def __init__(self, group=None, debug: bool | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.debug = os.environ.get(DEBUG_ENV, "0") not in ("", "0") if debug is None else debug
        self.reset_counters()

    def reset_counters(self) -> None:
        self.all_reduce_bytes = 0
        self.all_reduce_calls = 0
        self.all_gather_bytes = 0
        self.all_gather_calls = 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place (every rank ends with the same bits) and return it."""
        self.all_reduce_bytes += t.numel() * t.element_size()
        self.all_reduce_calls += 1
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t [..., n]`` (same shape on all ranks) along the last dim, rank order."""
        self.all_gather_bytes += t.numel() * t.element_size() * self.world
        self.all_gather_calls += 1
        t = t.contiguous()
        if t.is_cuda:
            out = torch.empty((self.world, *t.shape), dtype=t.dtype, device=t.device)
            dist.all_gather_into_tensor(out, t, group=self.group)
            parts = out.unbind(0)
        else:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=-1)

    def check_agree(self, what: str, t: torch.Tensor) -> None:
        """Raise unless every rank holds the same integer tensor ``t`` (the debug mode's check)."""
        gathered = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(gathered, t.contiguous(), group=self.group)
        for r, g in enumerate(gathered):
            if not torch.equal(g, gathered[0]):
                raise RuntimeError(
                    f"tensor-parallel ranks disagree on {what}: rank 0 has {gathered[0].tolist()}, "
                    f"rank {r} has {g.tolist()}"
                )

    def wrap_ops(self, ops):
        """``ops`` unchanged, or in debug mode with sampling / acceptance checked for agreement across ranks."""
        if not self.debug:
            return ops

        def accept_tree(*args, **kwargs):
            out = ops.accept_tree(*args, **kwargs)
            self.check_agree("accepted tokens", torch.cat([out.accept_path, out.accept_len[:, None],
                                                           out.next_token[:, None]], 1))
            return out

        def sample_tokens(*args, **kwargs):
            out = ops.sample_tokens(*args, **kwargs)
            self.check_agree("sampled tokens", out)
            return out

        return dataclasses.replace(ops, accept_tree=accept_tree, sample_tokens=sample_tokens)


# ----------------------------------------------------------------------------------------------------------------
# parallel modules
class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_local @ W_local^T) + b``: input features split over ranks, bias added once after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.tp = tp
        self.out_features, self.in_features = weight.shape  # local in_features, as nn.Linear reports them

    @classmethod
    def from_linear(cls, lin: nn.Linear, tp: TPGroup) -> "RowParallelLinear":
        return cls(lin.weight.data, None if lin.bias is None else lin.bias.data, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class AllReduceOutput(nn.Module):
    """Sums a module's partial outputs over the ranks (Mixtral's MoE block over intermediate-sharded experts)."""

    def __init__(self, inner: nn.Module, tp: TPGroup):
        super().__init__()
        self.inner = inner
        self.tp = tp

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """``args``: what the inner module takes after ``x`` (the op table, for the MoE block)."""
        return self.tp.all_reduce(self.inner(x, *args).contiguous())


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + n)`` of the embedding; ids outside them look up zeros, the all-reduce fills them in.

    Exact: every output element is one rank's row plus zeros.
    """

    def __init__(self, weight: torch.Tensor, start: int, vocab_size: int, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.num_embeddings, self.tp = start, vocab_size, tp
        self.embedding_dim = weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.tp.all_reduce(out.masked_fill(~inside[..., None], 0))


class VocabParallelLMHead(nn.Module):
    """Logits of rows ``[start, start + n)`` on each rank, all-gathered to ``[..., vocab_size]``.

    Shards are ``ceil(V / world)`` rows (the last one padded with zero rows), so the gather has equal shapes.
    Exact: every logit is one rank's full dot product.
    """

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TPGroup):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.vocab_size, self.tp = vocab_size, tp
        self.in_features, self.out_features = weight.shape[1], vocab_size
        self.shard = _vocab_shard(vocab_size, tp.world, 0)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight)
        if local.shape[-1] < self.shard:
            local = F.pad(local, (0, self.shard - local.shape[-1]))
        return self.tp.all_gather_last(local)[..., : self.vocab_size]


def _vocab_shard(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, rows)`` of a rank's vocabulary rows: ceil-sized shards, the last ones shorter."""
    per = -(-vocab // world)
    start = min(rank * per, vocab)
    return start, min(per, vocab - start) if rank < world - 1 else vocab - start


# ----------------------------------------------------------------------------------------------------------------
# sharded loading
@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Which slice of each HF tensor one rank reads."""

    world: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    vocab_parallel: bool

    @classmethod
    def make(cls, cfg: ModelConfig, world: int, rank: int, vocab_parallel: bool) -> "ShardPlan":
        nh, nkv = cfg.num_heads, cfg.num_kv_heads
        if nh % world:
            raise ConfigError(f"tensor_parallel={world} does not divide num_attention_heads={nh}")
        if nkv % world and world % nkv:
            raise ConfigError(
                f"tensor_parallel={world} and num_key_value_heads={nkv}: one must divide the other "
                "(KV heads are split, or replicated when there are fewer than ranks)"
            )
        if cfg.intermediate_size % world:
            raise ConfigError(f"tensor_parallel={world} does not divide intermediate_size={cfg.intermediate_size}")
        return cls(world, rank, nh, nkv, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, vocab_parallel)

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world

    @property
    def local_kv_heads(self) -> int:
        return max(self.num_kv_heads // self.world, 1)

    @property
    def kv_start(self) -> int:
        """First KV head of this rank: its share, or (replicated) the one its query heads read."""
        if self.num_kv_heads >= self.world:
            return self.rank * self.local_kv_heads
        return self.rank * self.local_heads // (self.num_heads // self.num_kv_heads)

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.world

    def index(self, key: str, shape: list[int]) -> tuple | None:
        """The slice of tensor ``key`` (HF name, ``model.`` prefix dropped) this rank reads; ``None``: all of it."""
        r, d, i = self.rank, self.head_dim, self.local_intermediate
        rows = lambda a, n: (slice(a, a + n),)  # noqa: E731
        cols = lambda a, n: (slice(None), slice(a, a + n))  # noqa: E731
        q0, qn = r * self.local_heads * d, self.local_heads * d
        kv0, kvn = self.kv_start * d, self.local_kv_heads * d
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            return rows(q0, qn)
        if key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
                         "self_attn.v_proj.bias")):
            return rows(kv0, kvn)
        if key.endswith("self_attn.o_proj.weight"):
            return cols(q0, qn)
        if key.endswith(("mlp.gate_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias",
                         ".w1.weight", ".w3.weight")):  # dense MLP and Mixtral's per-expert layout
            return rows(r * i, i)
        if key.endswith(("mlp.down_proj.weight", ".w2.weight")):
            return cols(r * i, i)
        if key.endswith("mlp.experts.down_proj"):  # transformers 5 fused experts [E, H, I]
            return (slice(None), slice(None), slice(r * i, r * i + i))
        if self.vocab_parallel and key in ("embed_tokens.weight", "lm_head.weight"):
            return rows(*_vocab_shard(self.vocab_size, self.world, r))
        return None

    def local_config(self, config: dict) -> dict:
        """The HF config of this rank's modules: local head counts and intermediate size."""
        local = dict(config, num_attention_heads=self.local_heads, num_key_value_heads=self.local_kv_heads,
                     head_dim=self.head_dim, intermediate_size=self.local_intermediate)
        if self.vocab_parallel:
            local["vocab_size"] = _vocab_shard(self.vocab_size, self.world, self.rank)[1]
        return local


def _safetensors_files(d: Path) -> list[str]:
    if (d / "model.safetensors.index.json").is_file():
        return index_shards(d, "model.safetensors.index.json")
    if (d / "model.safetensors").is_file():
        return ["model.safetensors"]
    if (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        raise CheckpointError(
            f"{d} holds pytorch_model.bin weights: tensor-parallel loading reads each rank's slices from "
            "safetensors and a .bin file cannot be sliced without reading all of it on every rank; convert it "
            "once (safetensors.torch.save_file) or load it without tensor parallelism"
        )
    raise CheckpointError(f"no weights in {d}: expected model.safetensors or model.safetensors.index.json")


def read_shards(d: Path, plan: ShardPlan) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's slices of every tensor of the checkpoint in ``d`` (HF names), and the bytes they hold."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    nbytes = 0
    for name in _safetensors_files(d):
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"shard {name} listed in the index is missing from {d}")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                k = key[len("model."):] if key.startswith("model.") else key
                sl = f.get_slice(key)
                shape = list(sl.get_shape())
                if k.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H], gate rows then up rows
                    r, i, half = plan.rank, plan.local_intermediate, shape[1] // 2
                    t = torch.cat([sl[:, r * i: r * i + i], sl[:, half + r * i: half + r * i + i]], dim=1)
                else:
                    idx = plan.index(k, shape)
                    t = sl[:] if idx is None else sl[idx]
                state[key] = t
                nbytes += t.numel() * t.element_size()
    return state, nbytes


def load_target_parallel(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_len: int | None = None,
    *,
    tensor_parallel: int | None = None,
    vocab: str = "replicated",
    group=None,
):
    """This rank's shard of a HF LLaMA / Mixtral target, wired for tensor parallelism over ``group``.

    The returned :class:`~eagle_runtime.model.Transformer` has local head counts and intermediate size in its
    ``cfg`` (so ``new_cache`` holds only local KV heads), the full ``vocab_size`` and ``raw`` config, and a
    ``tp`` attribute (:class:`TPGroup`; ``tp.bytes_loaded`` is what this rank read from the checkpoint).
    """
    if vocab not in ("replicated", "parallel"):
        raise ValueError(f"vocab must be 'replicated' or 'parallel', got {vocab!r}")
    device = local_device(device)
    init_distributed(device)
    tp = TPGroup(group)
    if tensor_parallel is not None and tensor_parallel != tp.world:
        raise ValueError(f"tensor_parallel={tensor_parallel} but the process group has {tp.world} ranks")
    d = resolve_dir(name_or_path)
    config = ModelConfig.read_json(d / "config.json")  # the checked reader: one-line errors for a bad file
    cfg = ModelConfig.from_dict(config)
    plan = ShardPlan.make(cfg, tp.world, tp.rank, vocab == "parallel")
    state, nbytes = read_shards(d, plan)
    try:
        model = target_from_state_dict(plan.local_config(config), state, dtype, device, max_len)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("<state dict>", str(d))) from None
    del state
    shard_model_(model, tp, plan)
    model.cfg = dataclasses.replace(model.cfg, vocab_size=cfg.vocab_size, raw=config)
    tp.bytes_loaded = nbytes
    model.tp = tp
    return model


def shard_model_(model, tp: TPGroup, plan: ShardPlan) -> None:
    """Module surgery on a model built from local shards: row-parallel o_proj / down_proj (or an all-reduced MoE
    block), vocab-parallel embedding and lm_head when the plan splits the vocabulary."""
    for layer in model.layers:
        attn = layer.self_attn
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, tp)
        if hasattr(layer.mlp, "down_proj"):
            layer.mlp.down_proj = RowParallelLinear.from_linear(layer.mlp.down_proj, tp)
        else:
            layer.mlp = AllReduceOutput(layer.mlp, tp)
    if plan.vocab_parallel:
        start = _vocab_shard(plan.vocab_size, tp.world, tp.rank)[0]
        tied = model.lm_head.weight is model.embed_tokens.weight
        model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.data, start, plan.vocab_size, tp)
        head = VocabParallelLMHead(model.lm_head.weight.data, plan.vocab_size, tp)
        if tied:
            head.weight = model.embed_tokens.weight
        model.lm_head = head


def tensor_parallel_size(model) -> int:
    """The tensor-parallel world of a target (1 when not sharded)."""
    tp = getattr(model, "tp", None)
    return tp.world if tp is not None else 1


__all__ = [
    "AllReduceOutput",
    "RowParallelLinear",
    "ShardPlan",
    "TPGroup",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "init_distributed",
    "is_main_process",
    "load_target_parallel",
    "read_shards",
    "resolve_tensor_parallel",
    "end_process_group",
    "shutdown_distributed",
    "tensor_parallel_size",
]
