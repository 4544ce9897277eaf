"""Training: the loop (``loop``), and LoRA-QAT (``lora``)."""

from .loop import LaunchError, TrainingStopped, train

__all__ = ["LaunchError", "TrainingStopped", "train"]
