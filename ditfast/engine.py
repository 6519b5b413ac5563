"""The sampling engine: one denoising step -- the model on the CFG-doubled batch, the CFG combine, the
sampler update (:mod:`ditfast.samplers`) -- is one function over static buffers.

Mode "graph" (the default of ``ditfast sample`` on CUDA) captures it once as a CUDA graph and
replays it per step: the step counter, the per-step scalars and the per-step noise live in device
tensors that the graph itself indexes and advances, so a step costs one replay call. "eager" runs
the same function in a Python loop, "compile" runs it compiled by ``torch.compile``. Weights are
cast once to the compute dtype; the timestep embeddings of all steps are computed once, before the
loop. The run layer (:mod:`ditfast.sampling`) feeds the engine batches of noise and labels.
"""

from __future__ import annotations

import copy

import torch

from .diffit import DiffiT, cfg_schedule_for
from .models import DiT
from .precision import tf32
from .samplers import Plan, update

__all__ = ["SamplingEngine", "PRECISIONS", "MODES", "check_cfg_model", "load_batch", "capture_graphs", "compute_autocast"]

# "fp64" is a reference mode (model, state and sampler arithmetic in float64): slow, but free of the
# float32 rounding that differs with BLAS blocking, so it checks properties such as batch-size independence.
PRECISIONS = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp64": torch.float64}  # fmt: skip
MODES = ("eager", "graph", "compile")


def _matmul_precision(precision: str):
    """TF32 matmuls/convolutions on for every precision but strict fp32, restored afterwards."""
    return tf32(precision != "fp32")


class _StepEmbedding(torch.nn.Module):
    """Stands in for a DiT's ``t_embedder`` inside the engine: the current step's row of a table of
    timestep embeddings computed once, before sampling, for every step of the plan, broadcast to
    the batch. (Besides saving the per-sample work, the real embedder builds its frequency table on
    the CPU and copies it over, which a CUDA graph cannot hold.)"""

    def __init__(self, table: torch.Tensor, k: torch.Tensor):
        super().__init__()
        self.table, self.k = table, k  # (S, D) embeddings; (1,) int64 step counter

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, self.k).expand(len(t), -1)  # (B, D)


def compute_autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast over weights already cast to ``dtype`` (LayerNorm and softmax stay fp32);
    off for fp32/tf32/fp64. The sampling engines' one rule."""
    lowp = dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device.type, dtype=dtype, enabled=lowp, cache_enabled=False)


def capture_graphs(device: torch.device, steps: dict, reset) -> dict:
    """CUDA graphs of the step functions ``steps`` ({key: fn}): each warmed up twice on a side stream
    (cuBLAS/cuDNN handles, Triton JIT, model caches; ``reset(key)`` first puts the step counter where
    that step may run), then captured once. Returns {key: graph}. The buffers must hold valid
    placeholders while this runs."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            for key, fn in steps.items():
                reset(key)
                fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graphs = {}
    for key, fn in steps.items():
        reset(key)  # outside the graph: the replays read the counter that run() sets
        graphs[key] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[key], capture_error_mode="thread_local"):  # the noise prefetch thread may pin memory
            fn()
    return graphs


def _with_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``model`` (sharing every parameter and other submodule) with submodule
    ``name`` replaced; ``model`` itself is unchanged."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view._modules[name] = module
    return view


class SamplingEngine:
    """Runs a :class:`~ditfast.samplers.Plan` on batches of up to ``batch_size`` samples.

    ``model``: a DiT on its device, left unchanged: the engine runs a view of it whose timestep
    embedder looks up a table computed once (see :class:`_StepEmbedding`), on a copy cast to the
    compute dtype of ``precision`` when the weights are not in it. ``cfg_scale`` > 1 runs the model on the [cond; null]
    doubled batch and guides with ``forward_with_cfg`` (the official 3-channel rule, or all eps
    channels with ``guide_all_channels``); 1 runs the plain conditional model on the batch.
    ``model`` may also be a :class:`~ditfast.DiffiT`; ``cfg_schedule`` ("auto", "power-cosine",
    "constant") is then its guidance schedule (:meth:`DiffiT.forward_with_cfg`; a DiT takes only
    "auto" or "constant").
    ``mode``: "eager", "graph" (CUDA only: captured on the first :meth:`run`) or "compile".

    Static buffers (shapes fixed at construction): ``x`` (B, C, H, W) float32 state (float64 with
    precision "fp64"), ``x0_prev``
    (DPM-Solver++), ``noise`` (S, B, C, H, W) (stochastic plans), ``y`` (B or 2B,) labels, ``k``
    (1,) int64 step counter, and the plan's ``timesteps`` (S,) and ``coefs`` (S, K) on the device.
    """

    def __init__(self, model: DiT, plan: Plan, *, batch_size: int, cfg_scale: float = 1.0, guide_all_channels: bool = False,
                 precision: str = "fp32", mode: str = "eager", cfg_schedule: str = "auto"):  # fmt: skip
        device = next(model.parameters()).device
        if mode not in MODES:
            raise ValueError(f"mode must be eager, graph or compile, got {mode!r}")
        if mode == "graph" and device.type != "cuda":
            raise ValueError(f"mode 'graph' captures a CUDA graph: it needs a CUDA device, the model is on {device}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if cfg_scale < 1:
            raise ValueError(f"cfg scale must be >= 1, got {cfg_scale}")
        if plan.learned_sigma != model.learn_sigma:
            raise ValueError(f"the plan assumes learned_sigma={plan.learned_sigma} but the model has {model.learn_sigma}")
        self.dtype = PRECISIONS[precision]
        if any(p.dtype != self.dtype for p in model.parameters()):
            model = copy.deepcopy(model).to(self.dtype)  # weights cast once; the caller's model is untouched
        self.plan, self.precision, self.mode, self.device = plan, precision, mode, device
        self.cfg_scale, self.guide_all_channels = float(cfg_scale), guide_all_channels
        self.guided = cfg_scale > 1
        if self.guided:
            check_cfg_model(model, guide_all_channels)
        # forward_with_cfg's keywords; a DiffiT also takes its guidance schedule (the plan's timesteps
        # are the original 0..999 ones, the scale its power-cosine schedule is defined on)
        self._cfg_kwargs = dict(guide_all_channels=guide_all_channels, full_batch=False)
        if isinstance(model, DiffiT):
            cfg_schedule_for(model.input_size, cfg_schedule)  # ValueError for an unknown schedule
            self._cfg_kwargs["cfg_schedule"] = cfg_schedule
        elif cfg_schedule not in ("auto", "constant"):
            raise ValueError(f"cfg schedule {cfg_schedule!r} is DiffiT's; a DiT guides with a constant scale "
                             "(cfg_schedule 'auto' or 'constant')")  # fmt: skip
        B, C, H = batch_size, model.in_channels, model.input_size
        self.batch_size, self.rows = B, (2 * B if self.guided else B)
        state = torch.float64 if self.dtype == torch.float64 else torch.float32  # the sampler's state and arithmetic
        self.x = torch.zeros(B, C, H, H, device=device, dtype=state)
        self.x0_prev = torch.zeros_like(self.x) if plan.multistep else None
        self.noise = torch.zeros(plan.steps, B, C, H, H, device=device, dtype=state) if plan.stochastic else None
        self.y = torch.zeros(self.rows, dtype=torch.int64, device=device)
        self.k = torch.zeros(1, dtype=torch.int64, device=device)
        self.timesteps, self.coefs = plan.timesteps.to(device), plan.coefs.to(device, state)
        with torch.no_grad(), _matmul_precision(precision), self._autocast():
            table = model.t_embedder(self.timesteps)  # (S, D): the timestep embedding of every step, once
        self.model = _with_module(model, "t_embedder", _StepEmbedding(table, self.k))
        self.model.training = False  # DiT reads its own flag for label dropout; the caller's model keeps its mode
        self.model.check_label_range = False  # run() checks each batch's labels once, not every step (host sync)
        self._graph = None
        self._fn = self._denoise
        if mode == "compile":
            self._fn = torch.compile(self._denoise, mode="max-autotune-no-cudagraphs", dynamic=False)

    def _denoise(self, x, x0_prev, k, y, noise):
        """One step, pure: (x, x0_prev) at step k -> (x at step k+1, x0 prediction at step k)."""
        t = self.timesteps.index_select(0, k)  # (1,) the original timestep (its embedding: _StepEmbedding)
        c = self.coefs.index_select(0, k)[0]  # (K,)
        with self._autocast():
            if self.guided:
                # (B, C_out, H, W): the guided rows only (forward_with_cfg duplicates them in a second half)
                out = self.model.forward_with_cfg(torch.cat([x, x]), t.expand(self.rows), y, self.cfg_scale,
                                                  **self._cfg_kwargs)  # fmt: skip
            else:
                out = self.model(x, t.expand(self.rows), y)  # (B, C_out, H, W)
        step_noise = noise.index_select(0, k)[0] if noise is not None else None
        return update(self.plan, x, out, c, step_noise, x0_prev)

    def _autocast(self):
        return compute_autocast(self.device, self.dtype)

    def _step(self) -> None:
        """Advance the static buffers by one step (what the CUDA graph holds)."""
        x, x0 = self._fn(self.x, self.x0_prev, self.k, self.y, self.noise)
        self.x.copy_(x)
        if self.x0_prev is not None:
            self.x0_prev.copy_(x0)
        self.k.add_(1)

    def _capture(self) -> None:
        """Capture one step (see :func:`capture_graphs`); the buffers hold zeros and label 0 meanwhile."""
        self._graph = capture_graphs(self.device, {"step": self._step}, lambda _: self.k.zero_())["step"]

    @torch.no_grad()
    def prepare(self) -> None:
        """Capture the CUDA graph now (graph mode; otherwise the first :meth:`run` does it)."""
        if self.mode == "graph" and self._graph is None:
            with _matmul_precision(self.precision):
                self._capture()

    @torch.no_grad()
    def step(self) -> None:
        """Advance the buffers by one step: a graph replay in graph mode. :meth:`run` loads a batch
        and calls this ``plan.steps`` times; benchmarks call it directly (set ``k`` in range first)."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()

    @torch.no_grad()
    def run(self, z: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample n <= batch_size images: ``z`` (n, C, H, W) initial noise, ``labels`` (n,),
        ``noise`` (S, n, C, H, W) per-step noise (stochastic plans). Returns the final (n, C, H, W)
        float32 on the model's device. Rows past n are padding (zeros, label 0): every batch has
        the same shape, so the kernels and their numerics do not depend on n. (float64 with
        precision "fp64".)"""
        n = load_batch(self, z, labels, noise)
        with _matmul_precision(self.precision):
            if self.x0_prev is not None:
                self.x0_prev.zero_()
            for _ in range(self.plan.steps):
                self.step()
            return self.x[:n].clone()


def load_batch(engine, z: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None) -> int:
    """Check a batch of n samples against a sampling engine's static buffers (``x``, ``y`` or None
    for an unconditional model, ``noise`` for a stochastic plan, ``k``), call its ``prepare`` (graph
    capture) and load the batch: rows past n are padding (zeros, label 0), the labels of the
    guided half the null class, the step counter 0. Returns n. (:class:`SamplingEngine` and
    :class:`ditfast.edm.EDMEngine`.)"""
    n, B, plan = len(z), engine.batch_size, engine.plan
    if not 1 <= n <= B or len(labels) != n:
        raise ValueError(f"expected 1..{B} initial noises with one label each, got {len(z)} and {len(labels)}")
    if engine.y is not None:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= engine.model.num_classes:
            raise ValueError(f"labels must lie in [0, {engine.model.num_classes - 1}], got values in [{lo}, {hi}]")
    if tuple(z.shape[1:]) != tuple(engine.x.shape[1:]):
        raise ValueError(f"initial noise must be (n, {', '.join(map(str, engine.x.shape[1:]))}), got {tuple(z.shape)}")
    if plan.stochastic and (noise is None or tuple(noise.shape) != (plan.steps, n, *engine.x.shape[1:])):
        raise ValueError(f"the {plan.sampler} plan needs per-step noise ({plan.steps}, {n}, ...), "
                         f"got {None if noise is None else tuple(noise.shape)}")  # fmt: skip
    engine.prepare()
    engine.x.zero_()
    engine.x[:n].copy_(z, non_blocking=True)
    if engine.y is not None:
        engine.y.zero_()
        engine.y[:n].copy_(labels, non_blocking=True)
        if engine.guided:
            engine.y[B:].fill_(engine.model.num_classes)  # the null class
    if engine.noise is not None:
        engine.noise.zero_()
        engine.noise[:, :n].copy_(noise, non_blocking=True)
    engine.k.zero_()
    return n


def check_cfg_model(model: DiT, guide_all_channels: bool) -> None:
    """Raise ValueError unless ``model`` can be sampled with classifier-free guidance (cfg scale > 1):
    the model's own rule, :meth:`DiT.cfg_channels`, which ``forward_with_cfg`` applies too."""
    model.cfg_channels(guide_all_channels)

