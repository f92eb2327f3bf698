"""The EAGLE-3 draft head: fused low/mid/high target features, one decoder layer, its own reduced-vocab lm_head.

Checkpoint layouts read (auto-detected; see ``shared/docs/FORMATS.md`` of the project):

- official (e.g. ``yuhuili/EAGLE3-LLaMA3.1-Instruct-8B``): a LLaMA ``config.json`` with ``draft_vocab_size`` and
  optional ``target_hidden_size``; tensors ``fc.weight [H, 3 H_t]`` (no bias), ``midlayer.*`` (``input_layernorm``,
  ``hidden_norm``, ``self_attn.{q,k,v}_proj [*, 2H]``, ``o_proj``, ``post_attention_layernorm``, ``mlp.*``),
  ``norm.weight``, ``lm_head.weight [V_draft, H]``, ``d2t [V_draft]``, ``t2d [V]``, optional
  ``embed_tokens.weight``.
- vllm ``speculators`` (``speculators_model_type: "eagle3"``): the layer config nested in
  ``transformer_layer_config``, ``eagle_aux_hidden_state_layer_ids``, ``norm_before_residual``; the same tensors
  with ``midlayer.`` spelled ``layers.0.``.

Forward at draft position ``i`` (hidden ``h_i``, token ``t_{i+1}``)::

    residual = h                     (hidden_norm(h) when norm_before_residual)
    x = cat(input_layernorm(embed(t)), hidden_norm(h))       # [.., 2H]: q/k/v read 2H inputs
    h = residual + attn(x);  h = h + mlp(post_attention_layernorm(h))
    logits = lm_head(norm(h))                                # draft vocabulary; target id = d + d2t[d]

The first step's ``h`` is ``fc(cat(h_low, h_mid, h_high))`` from the target's taps (inputs of layers 2, L//2,
L-3 by default; id L is the last layer's output before the final norm); deeper steps feed the layer's own
output ``h`` back (no fc).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from eagle_kernels import Ops

from .atomic import atomic_write, atomic_write_text
from .config import ModelConfig
from .drafter import Drafter, head_config, init_head_, load_checked
from .loading import CheckpointError
from .model import MLP, Attention, RMSNorm, Rotary, Transformer, bad_taps

EAGLE3_WEIGHTS = "pytorch_model.bin"
# Variants of the speculators format this runtime does not implement (config flag -> what it changes).
_UNSUPPORTED_FLAGS = {
    "norm_before_fc": "an RMSNorm over the concatenated taps before fc (input_norm.weight)",
    "fc_norm": "one RMSNorm per tap before fc (fc_norm.{0,1,2}.weight)",
    "norm_output": "the post-norm hidden state fed back to deeper draft steps ('EAGLE 3.1')",
}


def default_taps(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's tap layers: the inputs of layers 2, L//2 and L-3 (HF ``hidden_states`` indices)."""
    return (2, num_layers // 2, num_layers - 3)


class Eagle3Layer(nn.Module):
    """The head's decoder layer; attention reads ``cat(input_layernorm(embedding), hidden_norm(hidden))``."""

    def __init__(self, cfg: ModelConfig, norm_before_residual: bool = False):
        super().__init__()
        h = cfg.hidden_size
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, in_features=2 * h)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def attn_input(self, hidden: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention input [.., 2H], residual [.., H])``."""
        hn = self.hidden_norm(hidden)
        return torch.cat([self.input_layernorm(emb), hn], dim=-1), (hn if self.norm_before_residual else hidden)

    def finish(self, residual: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = residual + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, hidden, emb, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops):
        x, residual = self.attn_input(hidden, emb)
        return self.finish(residual, self.self_attn(x, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops))


class Eagle3Head(Drafter):
    """An EAGLE-3 head. Parameter names are the official layout's, so ``state_dict()`` is a loadable checkpoint.

    Args:
        cfg: the head's LLaMA config (``hidden_size`` H, heads, ``vocab_size`` = the target's vocabulary).
        max_len: rotary table length: the *target's* context (published heads say 2048 and are used past it).
        taps: target layer ids whose inputs feed ``fc`` (low | mid | high).
        draft_vocab_size: rows of ``lm_head`` (default: the full vocabulary).
        target_hidden_size: width of each tap (default H).
        own_embedding: the head has its own ``embed_tokens`` (else it uses the target's).
    """

    def __init__(
        self, cfg: ModelConfig, max_len: int, taps, draft_vocab_size: int | None = None,
        target_hidden_size: int | None = None, own_embedding: bool = False, norm_before_residual: bool = False,
    ):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.target_taps = tuple(int(t) for t in taps)
        self.draft_vocab_size = int(draft_vocab_size or cfg.vocab_size)
        self.target_hidden_size = int(target_hidden_size or h)
        self.fc = nn.Linear(len(self.target_taps) * self.target_hidden_size, h, bias=False)
        self.midlayer = Eagle3Layer(cfg, norm_before_residual)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, self.draft_vocab_size, bias=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h) if own_embedding else None
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.arange(cfg.vocab_size) < self.draft_vocab_size)
        self.register_buffer("_token_map", torch.arange(self.draft_vocab_size), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_map())
        self.rotary = Rotary(cfg, max_len)
        self.max_len = max_len

    # -- vocabulary map ----------------------------------------------------------------------------------------
    @property
    def token_map(self) -> torch.Tensor:
        """``[V_draft]`` int64: draft id -> target id (``d + d2t[d]``), on the head's device."""
        return self._token_map

    def _refresh_map(self) -> None:
        with torch.no_grad():
            self._token_map.copy_(torch.arange(self.draft_vocab_size, device=self.d2t.device) + self.d2t)

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Make the draft vocabulary ``target_ids`` (``[V_draft]`` distinct ids, ascending as the official
        heads store them): fills ``d2t`` and ``t2d``."""
        ids = torch.as_tensor(target_ids, dtype=torch.int64).flatten()
        if ids.numel() != self.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"need {self.draft_vocab_size} distinct target ids, got {ids.numel()}")
        ids = ids.sort().values.to(self.d2t.device)
        with torch.no_grad():
            self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
            self.t2d.zero_()
            self.t2d[ids] = True
        self._refresh_map()

    # -- the drafter interface -------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int | None = None) -> torch.Tensor:
        cfg, w = self.cfg, self.fc.weight
        s = max_len or self.max_len
        return torch.zeros(2, batch, cfg.num_kv_heads, s, cfg.head_dim, dtype=w.dtype, device=w.device)

    def first_input(self, states: torch.Tensor) -> torch.Tensor:
        """``fc`` over the concatenated taps ``[.., len(taps) * H_t]`` -> ``[.., H]``."""
        return self.fc(states.to(self.fc.weight.dtype))

    def embed(self, tokens: torch.Tensor, target: Transformer) -> torch.Tensor:
        embed = self.embed_tokens if self.embed_tokens is not None else target.embed_tokens
        return embed(tokens).to(self.fc.weight.dtype)

    def forward(self, hidden, tokens, target: Transformer, positions, cache, prefix_len, write_pos, mask, ops: Ops):
        """The layer's output ``[B, T, H]`` (fed to deeper steps) from hidden inputs and the tokens one ahead."""
        rope = self.rotary(positions, hidden.dtype)
        write_idx = write_pos[:, None] + torch.arange(hidden.shape[1], device=hidden.device)
        emb = self.embed(tokens, target)
        return self.midlayer(hidden, emb, rope, cache[0], cache[1], prefix_len, write_idx, mask, ops.for_forward())

    def draft_logits(self, hidden: torch.Tensor, target=None) -> torch.Tensor:
        """Logits ``[.., V_draft]``: only ``draft_vocab_size`` rows of the head's own lm_head are read."""
        return self.lm_head(self.norm(hidden))


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------
def is_eagle3(raw: dict, state: dict | None = None) -> bool:
    if "speculators_model_type" in raw or "draft_vocab_size" in raw:
        return True
    return state is not None and any(k.startswith("midlayer.") or k == "d2t" for k in state)


def _refuse_variants(raw: dict, state: dict, where: str) -> None:
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if raw.get(flag):
            raise CheckpointError(f"draft head {where}: EAGLE-3 variant {flag}=true ({what}) is not supported")
    if "input_norm.weight" in state:
        raise CheckpointError(f"draft head {where}: EAGLE-3 variant norm_before_fc (input_norm.weight) is not supported")
    if any(k.startswith("fc_norm.") for k in state):
        raise CheckpointError(f"draft head {where}: EAGLE-3 variant fc_norm (fc_norm.*) is not supported")


def load_eagle3(where: str, raw: dict, state: dict, target: Transformer, taps=None) -> Eagle3Head:
    """Build an :class:`Eagle3Head` from a checkpoint's config dict and tensors (either layout)."""
    spec = "speculators_model_type" in raw
    if spec:
        kind = raw["speculators_model_type"]
        if kind != "eagle3":
            raise CheckpointError(
                f"draft head {where}: speculators_model_type {kind!r} is not supported (this runtime loads 'eagle3')"
            )
        layer_raw = dict(raw.get("transformer_layer_config") or {})
        if not layer_raw:
            raise CheckpointError(f"draft head {where}: speculators config without transformer_layer_config")
        extra = sorted({k.split(".")[1] for k in state if k.startswith("layers.") and not k.startswith("layers.0.")})
        if extra or int(raw.get("num_layers", 1)) != 1:
            raise CheckpointError(f"draft head {where}: more than one decoder layer (layers {extra}) is not supported")
        state = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in state.items()}
        # The official semantics (false) when the key is missing; vLLM's converter wrongly assumes true.
        norm_before_residual = bool(raw.get("norm_before_residual", False))
        taps = taps or raw.get("eagle_aux_hidden_state_layer_ids")
    else:
        layer_raw = dict(raw)
        if int(raw.get("num_hidden_layers", 1)) != 1:
            raise CheckpointError(
                f"draft head {where}: num_hidden_layers={raw['num_hidden_layers']}: more than one layer is not supported"
            )
        norm_before_residual = bool(raw.get("norm_before_residual", False))
        taps = taps or raw.get("eagle_aux_hidden_state_layer_ids") or (raw.get("eagle_config") or {}).get(
            "eagle_aux_hidden_state_layer_ids")
    _refuse_variants(raw, state, where)
    layer_raw.setdefault("model_type", "llama")
    layer_raw["num_hidden_layers"] = 1
    for key in ("draft_vocab_size", "target_hidden_size"):
        if raw.get(key) is not None:
            layer_raw[key] = raw[key]
    cfg = ModelConfig.from_dict(layer_raw)
    tcfg = target.cfg
    taps = tuple(int(t) for t in (taps or default_taps(tcfg.num_layers)))
    bad = bad_taps(taps, tcfg.num_layers)
    if bad:
        raise CheckpointError(f"draft head {where}: tap layers {bad} are not in [0, {tcfg.num_layers}] of the target")
    if cfg.vocab_size != tcfg.vocab_size:
        raise CheckpointError(f"draft head {where} has vocab_size {cfg.vocab_size}, the target has {tcfg.vocab_size}")
    t_hidden = int(raw.get("target_hidden_size") or cfg.hidden_size)
    if t_hidden != tcfg.hidden_size:
        raise CheckpointError(
            f"draft head {where} reads target_hidden_size {t_hidden} (hidden_size {cfg.hidden_size}), "
            f"the target has hidden_size {tcfg.hidden_size}"
        )
    own_embed = "embed_tokens.weight" in state
    if cfg.hidden_size != tcfg.hidden_size and not own_embed:
        raise CheckpointError(
            f"draft head {where} has hidden_size {cfg.hidden_size} != the target's {tcfg.hidden_size} and no "
            "embed_tokens.weight of its own"
        )
    draft_vocab = int(raw.get("draft_vocab_size") or cfg.vocab_size)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "d2t" not in state:
        if draft_vocab != cfg.vocab_size:
            raise CheckpointError(f"draft head {where}: draft_vocab_size {draft_vocab} < vocab_size but no d2t map")
        state["d2t"] = torch.zeros(draft_vocab, dtype=torch.int64)
    d2t = state["d2t"].to(torch.int64)
    if d2t.shape != (draft_vocab,):
        raise CheckpointError(f"draft head {where}: d2t has shape {tuple(d2t.shape)}, expected ({draft_vocab},)")
    ids = torch.arange(draft_vocab) + d2t
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
        raise CheckpointError(f"draft head {where}: d2t maps draft ids outside the vocabulary [0, {cfg.vocab_size})")
    state["d2t"] = d2t
    if "t2d" not in state:  # unused at inference; rebuilt from d2t
        state["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool).index_fill_(0, ids, True)
    state["t2d"] = state["t2d"].to(torch.bool)
    cfg.attention_bias = "midlayer.self_attn.q_proj.bias" in state
    head = Eagle3Head(cfg, target.max_len, taps, draft_vocab, t_hidden, own_embed, norm_before_residual)
    load_checked(head, state, where)
    return head


# ------------------------------------------------------------------------------------------------------------
# Saving (official layout), construction for tests
# ------------------------------------------------------------------------------------------------------------
def eagle3_config(head: Eagle3Head) -> dict:
    """The official layout's config.json for ``head`` (plus the tap layers it reads)."""
    return dict(
        head.cfg.raw, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=1,
        tie_word_embeddings=False, vocab_size=head.cfg.vocab_size, draft_vocab_size=head.draft_vocab_size,
        target_hidden_size=head.target_hidden_size, eagle_aux_hidden_state_layer_ids=list(head.target_taps),
        norm_before_residual=head.midlayer.norm_before_residual,
    )


def save_eagle3(head: Eagle3Head, directory: str | Path, safetensors: bool = False) -> Path:
    """Write ``head`` in the official EAGLE-3 layout (config.json + pytorch_model.bin or model.safetensors)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    text = json.dumps(eagle3_config(head), indent=2)
    atomic_write_text(d / "config.json", text)
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        atomic_write(d / "model.safetensors", lambda p: save_file(state, str(p)))
    else:
        atomic_write(d / EAGLE3_WEIGHTS, lambda p: torch.save(state, p))
    return d


def eagle3_head_config(target_cfg: ModelConfig, draft_vocab_size: int, **overrides) -> ModelConfig:
    """A head config matching a target's widths, heads, vocabulary and rope, with a draft vocabulary size."""
    return head_config(target_cfg, draft_vocab_size=draft_vocab_size, **overrides)


def new_eagle3_head(target: Transformer, draft_vocab_size: int, taps=None, seed: int = 0, std: float | None = None,
                    vocab_ids: torch.Tensor | None = None, from_target: bool = False) -> Eagle3Head:
    """A freshly initialised head for ``target``; the draft vocabulary ``vocab_ids`` (default: a random subset
    of ``draft_vocab_size`` ids, seeded). ``from_target``: start ``lm_head`` and ``norm`` from the target's rows of
    the draft vocabulary and final norm (training starts from the target's own read-out)."""
    cfg = eagle3_head_config(target.cfg, draft_vocab_size)
    taps = taps or default_taps(target.cfg.num_layers)
    head = init_head_(Eagle3Head(cfg, target.max_len, taps, draft_vocab_size), seed, std)
    if vocab_ids is None:
        g = torch.Generator().manual_seed(seed)
        vocab_ids = torch.randperm(cfg.vocab_size, generator=g)[:draft_vocab_size]
    head.set_draft_vocab(vocab_ids)
    if from_target:
        with torch.no_grad():
            head.lm_head.weight.copy_(target.lm_head.weight.detach().cpu()[head.token_map])
            head.norm.weight.copy_(target.norm.weight.detach().cpu())
    w = target.embed_tokens.weight
    return head.to(device=w.device, dtype=w.dtype)


def random_head3(target: Transformer, draft_vocab_size: int | None = None, taps=None, seed: int = 0,
                 std: float = 0.02) -> Eagle3Head:
    """A random EAGLE-3 head for ``target`` (tests: drafts badly but decoding stays exact)."""
    v = draft_vocab_size or max(1, target.cfg.vocab_size // 2)
    return new_eagle3_head(target, v, taps, seed, std).eval().requires_grad_(False)
