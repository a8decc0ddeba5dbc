"""Trainer for svdserve adapters: data, built-in tasks, training loop, evaluation, CLI."""
