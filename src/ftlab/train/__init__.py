"""Thin adapters over TRL trainers that apply a method's Plan the same way for every method."""

from ftlab.train.sft import TrainResult, train_sft

__all__ = ["TrainResult", "train_sft"]
