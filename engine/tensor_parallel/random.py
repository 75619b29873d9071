"""Random-number streams for tensor parallelism, and activation recomputation that replays them.

Dropout in a tensor-parallel model must behave like dropout in the unsharded model:

* **Outside** sharded regions every TP rank holds the same full activation, so every TP rank must
  draw the same mask. The default generator (CPU, and the accelerator's when there is one) is
  therefore seeded identically on all TP ranks of a pipeline stage.
* **Inside** sharded regions (e.g. attention probabilities of this rank's heads) each TP rank holds
  a different slice, and its mask must be an independent draw, otherwise the "full" mask would
  repeat the same pattern ``tp`` times. Those draws come from a second, named stream, the
  *model-parallel* state, seeded differently on each TP rank and swapped in with
  ``get_rng_tracker().fork()``.

The tracker keeps named generator states and swaps one of them into the default generator of its
device for the duration of a ``with tracker.fork(name):`` block. Working on the *default*
generator (rather than passing ``generator=`` around) is what lets plain ``F.dropout`` and any
third-party op draw from the right stream. Nothing here assumes CUDA: the device is an argument
and defaults to `engine.device.default_device()`, so the same code runs on the CPU generator on a
laptop and on the CUDA generator on a GPU node.

`checkpoint(function, *args)` recomputes ``function`` during the backward pass instead of keeping
its activations; it records every RNG state before the forward and replays them before the
recomputation, so recomputed dropout masks are exactly the original ones.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from engine.device import default_device

MODEL_PARALLEL_RNG_NAME = "model-parallel-rng"
"""Name of the tracker state that differs across TP ranks (Megatron's name for it)."""

# Offsets of `model_parallel_seed`, as in Megatron-LM: pipeline stages hold different layers, so
# their default streams are offset by 100 per stage; the model-parallel stream is offset by 2718
# so it never coincides with a default stream of a nearby seed.
_PIPELINE_SEED_STRIDE = 100
_MODEL_PARALLEL_SEED_OFFSET = 2718


# Device generator access --------------------------------------------------------------------------


def _get_device_rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state on ``device`` (a uint8 tensor, on the CPU)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    # torch.cuda, torch.xpu, torch.mps ... share this interface; no backend is named here.
    return torch.get_device_module(device).get_rng_state(device)


def _set_device_rng_state(device: torch.device, state: torch.Tensor) -> None:
    """Load ``state`` into the default generator of ``device``."""
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device).set_rng_state(state, device)


def _seeded_state(device: torch.device, seed: int) -> torch.Tensor:
    """The state a default generator of ``device`` would have after ``manual_seed(seed)``.

    Built on a fresh generator so that no global stream is touched (``torch.manual_seed`` would
    reseed every device at once).
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator.get_state()


# The tracker --------------------------------------------------------------------------------------


class RNGStatesTracker:
    """Named RNG states for one device, swapped into its default generator by `fork`.

    Args:
        device: whose default generator the states belong to. ``None`` means
            `engine.device.default_device()` at the time of use (the CUDA device of this rank when
            there is one, else the CPU), so a tracker made at import time starts no CUDA context.
    """

    def __init__(self, device: torch.device | str | None = None):
        self._device = torch.device(device) if device is not None else None
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        """The device whose default generator `fork` swaps."""
        return self._device if self._device is not None else default_device()

    def reset(self, device: torch.device | str | None = None) -> None:
        """Forget every state; optionally move the tracker to another device.

        States of different devices are not interchangeable (the CPU's Mersenne Twister and
        CUDA's Philox differ in format), so the device only changes together with a reset.
        """
        self._states, self._seeds = {}, {}
        if device is not None:
            self._device = torch.device(device)

    def names(self) -> list[str]:
        """Names of the states held, in the order they were added."""
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Create the state ``name``, seeded with ``seed``.

        Raises ValueError if the name exists or the seed is already used by another state (two
        states with one seed would draw the same masks, silently correlating "independent"
        streams).
        """
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        for other, other_seed in self._seeds.items():
            if other_seed == seed:
                raise ValueError(f"seed {seed} for RNG state {name!r} is already used by {other!r}")
        self._seeds[name] = seed
        self._states[name] = _seeded_state(self.device, seed)

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every state, ``{name: uint8 tensor}``, to save in a checkpoint."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every state by ``states`` (as returned by `get_states`), e.g. on resume."""
        self._states = {name: state.clone() for name, state in states.items()}
        # Seeds of states that came from elsewhere are unknown; keep those still present.
        self._seeds = {name: seed for name, seed in self._seeds.items() if name in self._states}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_NAME) -> Iterator[None]:
        """Draw from the state ``name`` inside the block; the default stream resumes after it.

        On exit the advanced state is stored back under ``name`` (so the next fork continues
        the stream instead of repeating it) and the default generator gets back the state it had
        on entry (so code outside the block draws as if the block had not run).
        """
        if name not in self._states:
            raise KeyError(
                f"RNG state {name!r} is not in the tracker (has {self.names()}); "
                "call model_parallel_seed() or tracker.add() first"
            )
        device = self.device
        outside_state = _get_device_rng_state(device)
        _set_device_rng_state(device, self._states[name])
        try:
            yield
        finally:
            self._states[name] = _get_device_rng_state(device)
            _set_device_rng_state(device, outside_state)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker that the parallel layers and `checkpoint` use."""
    return _RNG_TRACKER


def model_parallel_seed(seed: int, device: torch.device | str | None = None) -> None:
    """Seed this rank's streams for a TP x PP x DP job (Megatron's model_parallel_cuda_manual_seed).

    With ``stage_seed = seed + 100 * pp_rank``:

    * the default generators (CPU and every accelerator) get ``stage_seed``: identical on all TP
      and DP ranks of a stage, so replicated activations get identical dropout masks and
      initialisation draws agree; different stages hold different layers and get other streams;
    * the tracker is reset and its `MODEL_PARALLEL_RNG_NAME` state gets
      ``stage_seed + 2718 + tp_rank``: different on every TP rank of a stage, identical across DP
      replicas (which must compute the same function of the same weights).

    Before `engine.parallel_state.initialize_model_parallel` has run, the ranks count as 0, so a
    single process can use the same call.

    Args:
        seed: the job's seed (``--seed``).
        device: the device of the tracker's generator; default `engine.device.default_device()`.
    """
    from engine import parallel_state  # local: keep this module importable on its own

    tp_rank, pp_rank = 0, 0
    if parallel_state.model_parallel_is_initialized():
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + _PIPELINE_SEED_STRIDE * pp_rank
    torch.manual_seed(stage_seed)
    _RNG_TRACKER.reset(device)
    _RNG_TRACKER.add(MODEL_PARALLEL_RNG_NAME, stage_seed + _MODEL_PARALLEL_SEED_OFFSET + tp_rank)


def get_rng_states() -> dict[str, Any]:
    """Every stream this module governs, to save in a checkpoint for an exact resume.

    Returns:
        ``{"cpu": uint8 tensor, "device": uint8 tensor or absent on CPU-only runs, "tracker":
        {name: uint8 tensor}}``: plain tensors and dicts, loadable with ``weights_only=True``.
    """
    device = _RNG_TRACKER.device
    states: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "tracker": _RNG_TRACKER.get_states(),
    }
    if device.type != "cpu":
        states["device"] = _get_device_rng_state(device)
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `get_rng_states` returned: the next draws repeat the ones made after it."""
    torch.set_rng_state(states["cpu"])
    if "device" in states:
        _set_device_rng_state(_RNG_TRACKER.device, states["device"])
    _RNG_TRACKER.set_states(states["tracker"])


# Activation recomputation -----------------------------------------------------------------------


class _CheckpointFunction(torch.autograd.Function):
    """Forward without a graph; backward replays the RNG, recomputes with a graph, back-propagates.

    Only the inputs are saved. Parameters used by ``function`` are not inputs: their gradients
    are accumulated into ``.grad`` by the inner ``torch.autograd.backward`` call.
    """

    @staticmethod
    def forward(ctx: Any, function: Callable[..., Any], *args: Any) -> Any:
        ctx.function = function
        ctx.rng_states = get_rng_states()
        # A custom Function's forward already runs without grad, so ``function`` builds no graph
        # and its intermediates are freed as soon as it returns.
        with torch.no_grad():
            outputs = function(*args)
        # Tensors go through save_for_backward (version-checked: an in-place change of an input
        # between forward and backward is an error, not a silent wrong gradient); everything
        # else is kept as it is, with a None placeholder where a tensor was.
        ctx.tensor_indices = [i for i, arg in enumerate(args) if torch.is_tensor(arg)]
        ctx.non_tensor_args = [None if torch.is_tensor(arg) else arg for arg in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_indices))
        return outputs

    @staticmethod
    def backward(ctx: Any, *output_grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # torch.autograd.grad() would need the inner backward to return gradients rather than
        # accumulate them into .grad; reentrant recomputation cannot do that (the same rule as
        # torch.utils.checkpoint's reentrant variant).
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "engine.tensor_parallel.checkpoint works with .backward() only, "
                "not torch.autograd.grad()"
            )
        args = list(ctx.non_tensor_args)
        for index, tensor in zip(ctx.tensor_indices, ctx.saved_tensors, strict=True):
            # Detached leaves: the recomputed graph must end here, and their .grad is what we
            # hand back to the outer graph.
            args[index] = tensor.detach().requires_grad_(tensor.requires_grad)

        states_now = get_rng_states()
        set_rng_states(ctx.rng_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*args)
        finally:
            # Later draws (other layers' backward-time recomputation, the next step) must not
            # see the replayed streams.
            set_rng_states(states_now)

        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, output_grads, strict=True)
            if torch.is_tensor(out) and out.requires_grad and grad is not None
        ]
        if pairs:
            torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        input_grads = tuple(arg.grad if torch.is_tensor(arg) else None for arg in args)
        return (None, *input_grads)


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, recomputed in the backward pass instead of storing its activations.

    Memory held between forward and backward is the inputs only (e.g. one ``[seq, batch,
    hidden]`` tensor for a whole decoder layer, instead of every intermediate). Before the
    forward this saves the CPU RNG state, the tracker device's RNG state and every tracker
    state; the backward restores them, recomputes ``function`` with grad, back-propagates, then
    puts back the states it found, so recomputed dropout masks equal the original ones and the
    streams continue as if nothing had been recomputed.

    Full recomputation checkpoints a whole decoder layer; selective recomputation only the core
    attention (the ``[batch, heads, seq, seq]`` part, cheap to recompute and large to keep).

    Args:
        function: the computation; may use parameters (their grads accumulate in ``.grad``), draw
            random numbers, and enter ``get_rng_tracker().fork()``.
        *args: tensors (requiring grad or not) and other values, passed on as they are.

    Returns:
        What ``function`` returns: a tensor or a tuple (which may mix tensors and other values).

    Inside a ``torch.compile`` region (``--compile``: the decoder layer that holds a
    selectively recomputed attention) it is ``torch.utils.checkpoint``, which the compiler
    traces without a graph break; dropout masks under it come from the compiled graph's own
    RNG handling rather than the tracker. Under ``torch.no_grad()`` (evaluation) ``function``
    simply runs once. With grad enabled at
    least one tensor input must require grad: otherwise autograd never calls the backward and the
    parameters inside ``function`` get no gradient (a warning says so).
    """
    if not torch.is_grad_enabled():
        return function(*args)
    if torch.compiler.is_compiling():
        # Inside a compiled region (--compile): saving RNG states would break the graph, and
        # torch's own checkpoint is what the compiler understands; it marks the region for
        # recomputation in the backward graph it builds.
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    if not any(torch.is_tensor(arg) and arg.requires_grad for arg in args):
        warnings.warn(
            "checkpoint(): no tensor input requires grad, so the parameters inside the "
            "checkpointed function will get no gradient; make the input require grad",
            stacklevel=2,
        )
    return _CheckpointFunction.apply(function, *args)
