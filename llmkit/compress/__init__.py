"""Model compression that changes the weights themselves: pruning (`prune`)."""
