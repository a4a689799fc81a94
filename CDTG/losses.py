"""The StyleGAN2 losses and regularisers, plus the tail teacher's classification loss."""
import math

import torch
import torch.nn.functional as F
from torch import autograd


def d_logistic_loss(real_pred, fake_pred):
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def d_r1_loss(real_pred, real_images):
    """Squared gradient norm of D at real images (needs real_images.requires_grad)."""
    (grad,) = autograd.grad(real_pred.sum(), real_images, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(1).mean()


def g_nonsaturating_loss(fake_pred):
    return F.softplus(-fake_pred).mean()


def g_path_regularize(fake_images, latents, mean_path_length, decay=0.01, noise=None):
    """Path-length penalty; returns (penalty, updated running mean, per-sample lengths).

    `noise` (standard normal, the fakes' shape) is drawn here unless given."""
    noise = torch.randn_like(fake_images) if noise is None else noise.to(fake_images)
    noise = noise / math.sqrt(fake_images.shape[2] * fake_images.shape[3])
    (grad,) = autograd.grad((fake_images * noise).sum(), latents, create_graph=True)
    path_lengths = torch.sqrt(grad.pow(2).sum(2).mean(1))
    path_mean = mean_path_length + decay * (path_lengths.mean() - mean_path_length)
    penalty = (path_lengths - path_mean).pow(2).mean()
    return penalty, path_mean.detach(), path_lengths


def teacher_classification_loss(teacher, images, labels):
    """CE of the frozen tail model M_T on the fakes: pushes them towards their class."""
    logits, _ = teacher(images)
    return F.cross_entropy(logits, labels)
