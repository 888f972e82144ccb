"""Reasoning tasks: puzzles, step formats, verifiers and prompts that search runs over."""
