"""Several processes under torchrun: the process group, ranks, collectives, sharding, DDP.

    torchrun --nproc_per_node=4 KMDN/UModel.py --split runs/dior/split --out runs/dior/kmdn

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init()` then joins the process group
(nccl on GPUs, gloo on CPUs) and gives each process the GPU of its LOCAL_RANK. Without
those variables (or with WORLD_SIZE=1) nothing changes: no process group, rank 0 of 1,
and every helper here is a no-op.

Batch sizes on the command line are global. Each global batch is drawn as in a single
process (from the seed and the epoch or step) and process r takes its positions
r, r + N, r + 2N, ... (`shard`), so N processes see the batches one process would (the
ResNet trainers' epochs aside: see tgn/sampling.py for their last batch).
"""
import atexit
import inspect
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tgn import compat
from tgn.errors import CollectiveError, ProcessError, UserError, under_torchrun
from tgn.runlock import claim_folder


def launched():
    """True when started by torchrun with more than one process."""
    return under_torchrun()


def active():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def is_main():
    """The process that logs, shows progress and writes checkpoints, samples and reports."""
    return rank() == 0


def checked_device(name):
    """The device --device names, checked against this machine; nothing is set up on it."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: untested here, and absent where not built in
        raise UserError(f"--device {name}: this code runs on CPUs and CUDA GPUs; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPUs")
    return device


def resolve_device(name):
    device = checked_device(name)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device)  # streams, events and new CUDA tensors then follow --device
        tune_cuda()
    return device


def tune_cuda():
    """Every stage feeds batches of fixed shapes, so cuDNN's autotuner pays off after the first
    batch; fp32 matrix products use TF32, as PyTorch already does for fp32 convolutions."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True


def init(device_name="auto"):
    """The device of this process; under torchrun also joins the process group (once).
    Scripts that check many inputs on the device call process_device first and init
    after those checks: an input error before joining prints once per node (errors.py)."""
    device = process_device(device_name)
    if launched() and not active():
        compat.init_process_group(backend_for(device), device)
        atexit.register(shutdown)
    return device


def backend_for(device):
    """nccl for GPUs where torch has it; gloo otherwise (CPUs, and GPUs on Windows, whose
    torch builds have no NCCL: gloo reduces CUDA tensors too, more slowly)."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def process_device(device_name="auto"):
    """The device of this process (under torchrun: the GPU of its LOCAL_RANK, or the CPU);
    joins nothing."""
    if not launched():
        return resolve_device(device_name)
    if device_name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device_name}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                        "pass --device cuda, auto or cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ProcessError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                               "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        tune_cuda()
        return device
    return torch.device("cpu")


def shutdown():
    global _host_group
    if active():
        dist.destroy_process_group()
    _host_group = None


_host_group = None


def host_group():
    """A gloo group of the job's processes, for small agreements on the host (under nccl
    a GPU collective read back would make the host wait for the GPU's queue). Every
    process must call it, the first time, at the same point; None outside torchrun."""
    global _host_group
    if active() and _host_group is None:
        _host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _host_group


def agreed_max(value):
    """The largest of the processes' integers `value` (this one's alone outside torchrun)."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=host_group())
    return int(tensor)


def barrier():
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` (any picklable value) in every process."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def collective_device():
    """Where collectives' tensors live: the process's GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_agree(flag):
    """True in every process when `flag` is true in every process (one collective)."""
    if not active():
        return bool(flag)
    return sum_numbers([0.0 if flag else 1.0], collective_device())[0] == 0


SHARED_FOLDER_WAIT_S = 10.0  # network file systems may show a new file to other nodes late


def make_shared_folder(folder, flag="--out"):
    """Create the run folder in every process, then (under torchrun) check that every
    process shares it with rank 0, and take it for this run (tgn.runlock: rank 0 holds
    it). A process that cannot create it, or a folder another run holds, stops them all,
    with one line from rank 0."""
    failure = None
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full file system, a file in the way
        failure = exc.strerror or str(exc)
    if not active():
        if failure:
            raise UserError(f"{flag} {folder}: cannot create it ({failure})")
        claim_folder(folder, flag=flag)
        return
    failures = [None] * world_size()
    dist.all_gather_object(failures, failure)
    failed = [rank for rank, reason in enumerate(failures) if reason]
    if failed:
        where = "" if failed == list(range(world_size())) else f" in process {failed[0]}"
        raise CollectiveError(f"{flag} {folder}: cannot create it{where} ({failures[failed[0]]})")
    check_shared_folder(folder, flag)
    refusal = None
    if is_main():
        try:
            claim_folder(folder, flag=flag)
        except UserError as exc:
            refusal = str(exc)
    refusal = broadcast_object(refusal)
    if refusal:
        raise CollectiveError(refusal)


def check_shared_folder(folder, flag="--out"):
    """Under torchrun, refuse (in every process at once) a folder some process does not
    share with rank 0: rank 0 alone writes checkpoints, and every process reads them back
    (--resume, the best epoch, generated images). On several nodes without a shared file
    system each node would silently resume, train or report on its own copy."""
    if not active():
        return
    token = broadcast_object(f"{os.getpid()}-{time.time_ns()}" if is_main() else None)
    probe = Path(folder) / f".shared-check-{token}"  # a fresh name: no stale cached lookup of it
    failure = None
    if is_main():
        try:
            probe.write_text(token, encoding="utf-8")
        except OSError as exc:  # a read-only or full file system
            failure = exc.strerror or str(exc)
    failure = broadcast_object(failure)  # also the barrier: the probe is written when it returns
    if failure:
        raise CollectiveError(f"{flag} {folder}: cannot write there ({failure})")
    deadline = time.monotonic() + SHARED_FOLDER_WAIT_S
    while not (seen := _holds(probe, token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    shared = all_agree(seen)
    if is_main():
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a probe left behind is harmless; stopping rank 0 alone here would not be
            pass
    if not shared:
        raise CollectiveError(f"{flag} {folder}: some processes of this torchrun job do not see the files rank 0 "
                              "writes there; on several nodes it must be on a file system every node shares")


def _holds(path, text):
    try:
        return path.read_text(encoding="utf-8") == text
    except OSError:  # not there (yet), or unreadable: not seen; never skip the collective after
        return False


def all_reduce_(tensor, average=False):
    """Sum (or mean) of `tensor` over the processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor)
        if average:
            tensor /= world_size()
    return tensor


def sum_numbers(values, device):
    """Python numbers summed over the processes (one collective for the lot)."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    return all_reduce_(tensor).tolist()


def broadcast_buffers_(module):
    """Copy rank 0's buffers (BatchNorm running statistics) to every process, so that every
    process evaluates the model rank 0 saves."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def planned_world_size():
    """The number of processes, before joining the group too (from torchrun's variables)."""
    return int(os.environ["WORLD_SIZE"]) if launched() and not active() else world_size()


def local_batch(batch_size, flag="--batch-size"):
    """This process's share of a global batch; scripts call it before joining as well, so
    that a batch that does not divide is refused before anything is written."""
    world = planned_world_size()
    if batch_size % world:
        raise CollectiveError(f"{flag} {batch_size} is the global batch and must be a multiple of the {world} "
                              "processes")
    return batch_size // world


def shard(items):
    """Positions rank, rank + N, rank + 2N, ... of a sequence or tensor (dim 0)."""
    return items[rank()::world_size()]


SYNC_BN_NEEDS_GPUS = "--sync-bn on needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); use auto or off"


def sync_batchnorm(model, device, mode="auto"):
    """BatchNorm statistics over all processes: 'auto' = on GPUs; PyTorch has no CPU kernel
    (the scripts refuse 'on' without GPUs before they write anything: tgn.cli.training_config)."""
    if not active() or mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model
    if device.type != "cuda":
        raise CollectiveError(SYNC_BN_NEEDS_GPUS)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap(module, device, sync_buffers=True):
    """DistributedDataParallel around `module` under torchrun; the module itself otherwise.
    `sync_buffers=False`: no copy of rank 0's buffers before each forward (StyleGAN2's
    buffers are constants)."""
    if not active():
        return module
    options = {}
    if not sync_buffers:  # the flag's name changed in recent PyTorch releases
        ddp_flags = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        options["forward_sync_buffers" if "forward_sync_buffers" in ddp_flags else "broadcast_buffers"] = False
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, **options)


def describe():
    """' (N processes, backend)' under torchrun, '' otherwise: for the start-up line."""
    return f" ({world_size()} processes, {dist.get_backend()})" if active() else ""
