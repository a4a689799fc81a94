"""Adam and its step learning rates, as every trainer uses them (the ResNet stages and CDTG)."""
import torch

from tgn.compat import has_fused_adam
from tgn.errors import UserError


def adam(parameters, **options):
    """torch.optim.Adam with its fused kernel where torch has one for the device (GPUs; CPUs
    from torch 2.4): every parameter updated in a few passes, the arithmetic of the default
    kernel (on CPUs one parameter at a time) up to float rounding. On 2 CPU cores ResNet-50's
    update took 14 ms against 81 ms."""
    parameters = list(parameters)
    fused = has_fused_adam(parameters[0].device.type)
    return torch.optim.Adam(parameters, fused=True if fused else None, **options)


def restore_optimizer(optimizer, state):
    """load_state_dict, keeping this run's kernel choice (fused on GPUs): the saved state
    carries the flags of the run that wrote it, perhaps on another device or version. The
    flags are set before loading, which places each step counter where the kernel wants it."""
    kernel_flags = ("fused", "foreach", "capturable")
    if len(state["param_groups"]) != len(optimizer.param_groups):  # zip below would drop the extra ones unsaid
        raise UserError(f"the checkpoint's optimizer state has {len(state['param_groups'])} parameter groups, this "
                        f"run's optimizer {len(optimizer.param_groups)}: not a checkpoint of this run's models")
    groups = [{**saved, **{key: current.get(key) for key in kernel_flags}}
              for saved, current in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


def make_optimizer(model, cfg):
    """Adam over the model's parameters, which must already be on their device."""
    return adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def step_lr(optimizer, base_lr, epoch, milestones, gamma=0.1):
    """Divide the learning rate by 1/gamma after each milestone epoch (0-indexed epochs)."""
    lr = base_lr * gamma ** sum(epoch >= m for m in milestones)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
