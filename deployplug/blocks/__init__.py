"""Training-time multi-branch blocks that know how to fuse themselves for deployment."""

from deployplug.blocks.repvgg import RepVGGBlock

__all__ = ["RepVGGBlock"]
