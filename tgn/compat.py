"""The differences between the PyTorch releases we support (2.1 and later), in one place.

Clusters often keep an older torch than the one we pin. Each helper uses today's API where
torch has it and the older spelling where it does not, so the scripts run unchanged on
either (the test suite passes on torch 2.1.2 and on our pin).
"""
import contextlib
import functools
import inspect
import warnings

import torch
import torch.distributed as dist

from tgn.errors import UserError

# --compile: torch 2.1's compiler fails on the SWAGAN, 2.4's compiled ResNet drifts from eager
# training, and 2.5's DDP refuses the compiled CDTG passes (a higher-order op); 2.6 passes.
COMPILE_SINCE = (2, 6)


def torch_version():
    """(major, minor) of the running torch, e.g. (2, 1)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def mark_cuda_graph_step():
    """Tell torch.compile's CUDA graphs that a new step begins: its replay may reuse the
    memory of the last step's outputs (torch.compiler has the call from 2.2 on)."""
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
    if mark is None:
        from torch._inductor.cudagraph_trees import mark_step_begin as mark
    mark()


def check_compile(mode):
    """--compile (`mode`: a torch.compile mode, True, or 'off' / False) is refused, in one
    line, on a torch whose compiler fails on our models."""
    if mode not in ("off", False) and torch_version() < COMPILE_SINCE:
        raise UserError(f"--compile needs torch {'.'.join(map(str, COMPILE_SINCE))} or later (torch "
                        f"{torch.__version__}'s compiler fails on these models); run without --compile")


def check_amp(amp, device, training=True):
    """--amp (resolved: off, bf16 or fp16) is refused, in one line, where this torch cannot
    train (or, `training` False, evaluate) with it on `device`: fp16 on CPUs before torch
    2.3 (no CPU loss scaler; 2.1 autocasts CPUs to bf16 only)."""
    if amp == "off":
        return
    problem = None
    if training and amp == "fp16" and device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
        problem = "has no loss scaler for it there"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch 2.1 warns before it raises
                torch.autocast(device_type=device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)
        except RuntimeError:
            problem = "cannot autocast to it there"
    if problem:
        instead = "--amp bf16 or --amp off" if amp == "fp16" else "--amp off"
        raise UserError(f"--amp {amp} on {device.type}: torch {torch.__version__} {problem}; use {instead}")


def grad_scaler(device):
    """The loss scaler fp16 needs (torch.amp's device-generic one from 2.3 on; before, fp16
    training ran on CUDA only)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


@functools.lru_cache(maxsize=None)
def has_fused_adam(device_type):
    """Whether torch.optim.Adam has a fused kernel for this device type: CUDA, and CPUs from
    torch 2.4 on (older releases refuse fused=True off the GPU)."""
    if device_type == "cuda":
        return True
    try:
        torch.optim.Adam([torch.zeros(1, device=device_type, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def can_load_classes():
    """Whether torch.load(weights_only=True) can be allowed to rebuild a named class
    (torch.serialization.add_safe_globals, from 2.4 on)."""
    return hasattr(torch.serialization, "add_safe_globals")


def loading_classes(classes):
    """A context in which torch.load(weights_only=True) also rebuilds `classes`, and
    nothing else beyond plain data; before torch 2.4 it changes nothing (can_load_classes)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(classes)
    if can_load_classes():
        return _allowed_meanwhile(classes)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _allowed_meanwhile(classes):
    """torch 2.4 has only the process-wide list: add to it, and put it back afterwards."""
    before = list(torch.serialization.get_safe_globals())  # a copy: it returns the list itself
    torch.serialization.add_safe_globals(classes)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def init_process_group(backend, device):
    """dist.init_process_group, bound to this process's GPU where torch can (device_id,
    from 2.3 on: NCCL then sets up its communicator eagerly on the right GPU)."""
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
