"""CUDA graphs for inference at fixed shapes: record a step once, replay it without launching kernels from Python.

At batch 1 the GPU finishes HyperStyle's ~2,000 small kernels faster than Python can launch them; replaying a
recorded graph removes that cost. A graph reads and writes fixed memory, so inputs are copied into its own input
tensors, and its outputs are overwritten by the next replay (callers copy what they keep). Graphs are keyed by the
shapes and dtypes of their inputs and are dropped whenever the model's weights move (their addresses are baked in).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch

from . import warmup


class GraphCache:
    def __init__(self, device: torch.device, warmup_budget: Optional[Callable[[int], int]] = None):
        """warmup_budget(batch): bytes a first call of that batch size may add to the memory in use (its working set
        with some room); None: no cap (see `_warm_up`)."""
        self.device = device
        self.warmup_budget = warmup_budget
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for all graphs of a model, replayed in turn
        self.graphs: dict = {}
        self.announced: set = set()

    def run(self, name: str, fn: Callable, inputs: Sequence[torch.Tensor]):
        """fn(*inputs) through a graph recorded on first use for these input shapes. The returned tensors belong to
        the graph: valid until its next replay."""
        # the TF32 switches change which kernels get recorded
        key = ((name, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
               + tuple((tuple(t.shape), t.dtype) for t in inputs))
        entry = self.graphs.get(key)
        if entry is None:
            self._announce(inputs[0])
            entry = self.graphs[key] = self._record(fn, inputs)
        graph, static_inputs, static_outputs = entry
        for dst, src in zip(static_inputs, inputs):
            if src is not dst:  # a graph that updates an input in place and returns it gets it back as is
                dst.copy_(src)
        graph.replay()
        return static_outputs

    def _announce(self, first_input: torch.Tensor) -> None:
        """Says once per batch size, dtype and TF32 mode that this first call compiles and records (it takes longer)."""
        from .generator import compile_enabled

        shape = (first_input.shape[0], first_input.dtype, torch.backends.cudnn.allow_tf32,
                 torch.backends.cuda.matmul.allow_tf32)
        if shape not in self.announced:
            self.announced.add(shape)
            compiling = compile_enabled()
            if compiling:
                warmup.use_persistent_cache()
            warmup.notice(warmup.describe_first_call(first_input.shape[0], first_input.dtype, compiling))

    def _record(self, fn: Callable, inputs: Sequence[torch.Tensor]):
        static_inputs = [t.detach().clone() for t in inputs]
        # warm up outside the graph: cuDNN/cuBLAS pick their kernels and torch.compile compiles here
        side = warmup_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._warm_up(fn, static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_outputs = fn(*static_inputs)
        return graph, static_inputs, static_outputs

    def _warm_up(self, fn: Callable, inputs: Sequence[torch.Tensor]) -> None:
        """Two calls, the first under a memory cap: cuDNN chooses a convolution's plan on its first call and keeps
        it, and without TF32 its first choice for one of ours asked for a 65 GiB workspace (H100, fp32, batch 1:
        a 66.7 GiB peak against 1.94 GiB in the steady state). Under the cap that allocation fails inside cuDNN,
        which takes its next plan. If the work itself does not fit under the cap, it runs again without one."""
        budget = None if self.warmup_budget is None else self.warmup_budget(inputs[0].shape[0])
        try:
            with memory_cap(self.device, budget):
                fn(*inputs)
        except torch.cuda.OutOfMemoryError:
            fn(*inputs)
        fn(*inputs)


@contextlib.contextmanager
def memory_cap(device: torch.device, extra_bytes: Optional[int]):
    """Within the block, the caching allocator may hold at most what it holds now plus extra_bytes (through
    `set_per_process_memory_fraction`, restored afterwards; a tighter cap already set is kept). No-op for None or
    where PyTorch cannot report the current fraction."""
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if extra_bytes is None or get_fraction is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    previous = get_fraction(device)
    limit = (torch.cuda.memory_reserved(device) + extra_bytes) / total
    if limit >= previous:
        yield
        return
    torch.cuda.set_per_process_memory_fraction(limit, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous, device)


_WARMUP_STREAMS: dict = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for all warm-ups. cuBLAS keeps a workspace (32 MiB on Hopper) for every stream it
    has run on, for the life of the process: a new stream per recorded graph added 32 MiB each time."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


class GraphedInference:
    """Mixin for an engine's nn.Module whose inference replays CUDA graphs: one `GraphCache`, made on demand and
    dropped whenever the weights move or are replaced (recorded graphs point at their addresses). The module calls
    `_init_graphs()` in its __init__ and defines `_warmup_budget(batch)` (see GraphCache)."""

    def _init_graphs(self) -> None:
        self.cuda_graphs = True  # replay recorded CUDA graphs at inference; False: always run eagerly
        self._graph_cache: Optional[GraphCache] = None
        self._graph_weights: tuple = ()
        self._weights_watch = WeightsWatch()

    def _graphs(self) -> Optional[GraphCache]:
        """The model's graph cache, or None where graphs do not apply (CPU, autograd, training, turned off)."""
        if not (self.cuda_graphs and self.device.type == "cuda" and not torch.is_grad_enabled()
                and not self.training):
            return None
        signature = self._weights_watch.signature(self)
        if self._graph_cache is None or signature != self._graph_weights:
            self._graph_cache, self._graph_weights = GraphCache(self.device, self._warmup_budget), signature
        return self._graph_cache

    def _forget_graphs(self) -> None:
        """Drops the recorded graphs and, with them, their memory pool."""
        self._graph_cache, self._graph_weights = None, ()

    def _apply(self, fn, *args, **kwargs):
        self._forget_graphs()  # moved or cast weights: recorded graphs are stale
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        """Copies and pickles get no recorded graphs (they point at the original's weights)."""
        state = self.__dict__.copy()
        state.update(_graph_cache=None, _graph_weights=(), _weights_watch=WeightsWatch())
        return state


_BRANCH_STREAMS: dict = {}


class Fork:
    """Independent work on a second CUDA stream, concurrent with the current stream's: at batch 1 one network
    leaves most of the GPU idle, so two can share it. `run` enqueues on the branch, `join` makes the current stream
    wait for it (always call it before using the results). Inside a CUDA-graph recording this is a fork and join of
    the captured stream, which the graph keeps. One branch stream per device, reused (cuBLAS keeps a workspace per
    stream: see `warmup_stream`)."""

    def __init__(self, device: torch.device):
        if device not in _BRANCH_STREAMS:
            _BRANCH_STREAMS[device] = torch.cuda.Stream(device)
        self.main = torch.cuda.current_stream(device)
        self.branch = _BRANCH_STREAMS[device]
        self.branch.wait_stream(self.main)  # the branch sees the inputs the main stream has written

    def run(self, fn: Callable, *args):
        with torch.cuda.stream(self.branch):
            return fn(*args)

    def join(self, *outputs: Optional[torch.Tensor]) -> None:
        self.main.wait_stream(self.branch)
        for t in outputs:
            if t is not None:  # made on the branch, used and freed on the main stream
                t.record_stream(self.main)


def fork(t: torch.Tensor) -> Optional[Fork]:
    """A `Fork` on t's CUDA device, or None elsewhere (run the work in turn)."""
    return Fork(t.device) if t.is_cuda else None


def weights_signature(module: torch.nn.Module) -> tuple:
    """Addresses of every parameter and buffer: a recorded graph is valid only while they are unchanged."""
    return tuple(t.data_ptr() for t in module.parameters()) + tuple(t.data_ptr() for t in module.buffers())


class WeightsWatch:
    """`weights_signature`, cheaply. Gathering a module's parameters and buffers walks its whole tree (1-2 ms of Python
    for HyperStyle's ~900 tensors, as long as a batch-1 decode on the GPU), so the list is gathered again only after
    some module registered a parameter, buffer or submodule (how weights get replaced); the addresses are read on
    every call, so weights moved in place (`.to()`, `param.data = ...`) are seen as before."""

    _registrations = 0
    _hooked = False

    def __init__(self):
        self._seen, self._owner, self._tensors = -1, None, []
        WeightsWatch._hook()

    def signature(self, module: torch.nn.Module) -> tuple:
        if self._seen != WeightsWatch._registrations or self._owner != id(module) or not WeightsWatch._hooked:
            self._seen, self._owner = WeightsWatch._registrations, id(module)
            self._tensors = list(module.parameters()) + list(module.buffers())
        return tuple(map(torch.Tensor.data_ptr, self._tensors))

    @classmethod
    def _hook(cls) -> None:
        if cls._hooked:
            return
        names = ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                 "register_module_module_registration_hook")
        hooks = [getattr(torch.nn.modules.module, name, None) for name in names]
        if None in hooks:
            return  # an older PyTorch: the signature is recomputed on every call

        def count(*_args):
            cls._registrations += 1

        for register in hooks:
            register(count)
        cls._hooked = True
