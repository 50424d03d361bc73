"""Feature extraction for the `features` stage: vision towers, tokenisation, frozen text states,
imported arrays, and the numpy <-> Arrow column helpers of the features layout (schemas/features.py)."""
