"""What a grafted run found, carried over to plain optimizers: static per-layer corrections
derived from its recorded norms, and the trend of its implicit schedule (`graft-static`)."""
