"""Processing: the loop (poll, a batch's claim book and lanes, commit), the per-message
state machine (claim, run, deliver, complete), completions, leases, the store guard,
outcomes, the handler context, and the dedup modes (``modes/``)."""
