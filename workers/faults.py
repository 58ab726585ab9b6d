"""Whose fault an exception in a step is, and the error a job fails with.

A device fault (out of memory, a CUDA error) belongs to the device: it touches the jobs of that forward, and a fatal
one (the CUDA context cannot be trusted any more) ends the worker. Every other exception raised while prefilling,
sampling, stopping or detokenising belongs to the job that caused it: that job alone fails, with
`generation_failed` naming the stage and the exception (a LlavaError keeps its own code).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contract.errors import DeviceError, GenerationFailed, LlavaError
from contract.messages import SamplingParams
from workers.sampling import sample_batch

# Messages of device failures after which the CUDA context cannot be trusted any more.
_FATAL_DEVICE_MARKERS = ("CUDA error", "device-side assert", "illegal memory access", "CUBLAS_STATUS", "ECC")
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors


def is_fatal_device_fault(exc: BaseException) -> bool:
    """A device error after which the device cannot be used any more."""
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _FATAL_DEVICE_MARKERS)


def is_out_of_memory(exc: BaseException) -> bool:
    """The device ran out of memory: the same work may pass in smaller pieces, or once memory is freed."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # The caching allocator's message, raised as a plain RuntimeError by some kernels and by older torch.
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc) and not is_fatal_device_fault(exc)


def is_device_fault(exc: BaseException) -> bool:
    """Out of memory, or an error of the accelerator itself; anything else is the fault of a job."""
    if is_out_of_memory(exc):
        return True
    if _ACCELERATOR_ERROR is not None and isinstance(exc, _ACCELERATOR_ERROR):
        return True
    return is_fatal_device_fault(exc)


def device_error(exc: BaseException, where: str) -> DeviceError:
    kind = "out of memory" if is_out_of_memory(exc) else type(exc).__name__
    return DeviceError(f"the device failed during {where} ({kind}): {str(exc)[:300]}")


def release_cached_memory(device: str) -> None:
    """Hand the allocator's cached blocks back to the device, so that a retry after out of memory finds them."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def job_error(exc: BaseException, where: str) -> LlavaError:
    """The error a job fails with when its own input made `where` raise `exc`."""
    if isinstance(exc, LlavaError):
        return exc
    return GenerationFailed(f"generating this job failed during {where} ({type(exc).__name__}: {str(exc)[:300]})")


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> tuple[list[int | None], dict[int, BaseException]]:
    """One token per row of `logits`, and the rows whose sampling raised (their token is None).

    The batch is sampled at once; when that raises, each row is sampled again alone from its generator's state
    before the batch, so the other rows get exactly the tokens they would have got. A device fault is raised."""
    states = [g.get_state() if isinstance(g, torch.Generator) else None for g in generators]
    try:
        return list(sample_batch(logits, params, generators)), {}
    except Exception as exc:
        if is_device_fault(exc):
            raise
    tokens: list[int | None] = []
    faults: dict[int, BaseException] = {}
    for i, (p, g, state) in enumerate(zip(params, generators, states, strict=True)):
        if state is not None:
            g.set_state(state)
        try:
            tokens.append(sample_batch(logits[i : i + 1], [p], [g])[0])
        except Exception as exc:
            if is_device_fault(exc):
                raise
            tokens.append(None)
            faults[i] = exc
    return tokens, faults
