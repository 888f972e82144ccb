"""Reasoning search on the engine: tree, MCTS, beam search, tree-of-thought, best-of-N."""
