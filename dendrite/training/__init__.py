"""Training the small models Dendrite ships: tokenizer, batches, loop helpers, loss plots."""
