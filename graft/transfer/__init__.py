"""What a grafted run found, carried over to plain optimizers: static per-layer corrections,
schedule replay, and the trend of an implicit schedule (`graft-static`)."""
