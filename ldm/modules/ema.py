"""Exponential moving average of a module's trainable weights (CompVis ``LitEma`` layout)."""
import torch
from torch import nn


class LitEma(nn.Module):
    """Shadow copies of ``model``'s trainable parameters, stored as buffers named like
    CompVis' (the dotted name with dots removed) so they travel in Lightning checkpoints.

    The effective decay warms up as min(decay, (1 + n) / (10 + n)) (CompVis' choice).
    """

    def __init__(self, model, decay=0.9999, use_num_updates=True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("EMA decay must be between 0 and 1")
        self.names = {n: n.replace(".", "") for n, p in model.named_parameters() if p.requires_grad}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1,
                                                         dtype=torch.int64))
        for name, p in model.named_parameters():
            if name in self.names:
                self.register_buffer(self.names[name], p.detach().clone().float())

    @torch.no_grad()
    def forward(self, model):
        decay = self.decay.item()
        if self.num_updates >= 0:
            self.num_updates += 1
            n = self.num_updates.item()
            decay = min(decay, (1 + n) / (10 + n))
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                shadow[self.names[name]].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model):
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.names:
                p.copy_(shadow[self.names[name]].to(p.dtype))
