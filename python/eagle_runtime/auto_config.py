"""Every tunable of ``tree="auto"`` in one frozen config; :mod:`eagle_runtime.adaptive` explains what each does.

Pass a changed copy to :class:`~eagle_runtime.adaptive.AutoTree`::

    from dataclasses import replace
    AutoTree(config=replace(AutoConfig(), probe_every=16))
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AutoConfig:
    """The adaptive tree's tunables (defaults measured on the demo pair and stories260k, CPU)."""

    # --- the controller (AutoController)
    probe_every: int = 32  # plain steps between probing speculative cycles while plain decoding wins
    decide_every: int = 16  # speculative steps between re-decisions (every 2 while < 32 path nodes are observed)
    switch_margin: float = 0.93  # plain <-> speculation: another must be predicted 7.5% faster
    tree_switch_margin: float = 0.98  # one tree -> another: 2%
    spec_margin: float = 1.08  # with the hysteresis: plain -> a tree at 1.16x plain's rate, back below 1.0x
    backoff: int = 8  # probe gap cap, x probe_every, while probes keep confirming plain decoding ...
    far_backoff: int = 32  # ... and while the best tree is predicted below far_ratio x plain decoding
    far_ratio: float = 0.8
    # 1: the best predicted tree (0.97 took the smallest within 3%, which kept chains short and their deep levels
    # unobserved: MT-bench auto at temperature 0 1.84-1.86x against 2.14x on one calibration)
    tie_band: float = 1.0

    # --- the acceptance estimate (AcceptStats)
    max_rank: int = 16
    decay: float = 0.995  # per observed node: about the last 200 nodes count
    prior_p: tuple = (0.5, 0.12, 0.05, 0.03)
    prior_weight: float = 2.0
    depths: int = 6  # per-depth estimates for depths 1..depths (the last bucket holds deeper levels)
    depth_weight: float = 8.0  # pseudo-observations pulling a depth's estimate to the pooled one
    measure_decay: float = 0.97  # measured/predicted ratio, per step of that kind: about the last 30 count
    min_measured: float = 6.0  # decayed steps a kind needs before its ratio is used
    fit_decay: float = 0.95  # emitted/expected per tree kind, per cycle of any kind: about the last 20 count
    fit_prior: float = 8.0  # tokens of pseudo-observation at the model's expectation (about two cycles)

    def __post_init__(self):
        for name in ("probe_every", "decide_every", "max_rank", "depths"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AutoConfig.{name} must be an integer >= 1, got {v!r}")
        for name in ("decay", "measure_decay", "fit_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"AutoConfig.{name} must lie in (0, 1], got {getattr(self, name)!r}")


__all__ = ["AutoConfig"]
