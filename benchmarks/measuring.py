"""What both benchmarks measure with: waiting for the GPU, freeing memory between cases,
and the facts every record carries about where it was measured."""
import datetime
import gc
import os

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device):
    """Free what earlier cases left cached and reset the peak, so that a case's peak and
    reserved memory are its own (a reset peak starts from what the allocator still holds).
    Compiled graphs go too: a reduce-overhead case's CUDA graph pool outlives its model."""
    if device.type == "cuda":
        import torch._dynamo

        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def machine_facts(device):
    """The device, torch, the host's CPU count and the UTC date; on GPUs whether fp32 matrix
    products and convolutions ran in TF32 (tgn's tune_cuda turns it on for matrix products,
    PyTorch's default already has it for convolutions), since an "fp32" figure means that."""
    gpu = device.type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
            "tf32": (torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32) if gpu else None,
            "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
