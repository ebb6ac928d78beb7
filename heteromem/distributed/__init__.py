"""Sharding a wrapped model over torch.distributed ranks (ZeRO-3 style): each rank owns an
equal part of every chunk's parameters and optimizer state; chunks are all-gathered before
use and gradients reduce-scattered into their owners' parts. See docs/distributed.md."""
