"""The one memory abstraction: (key, value) entries searched by a query.

* :mod:`.keys`         -- reading g (memory key) and f (output feature) from a model
* :mod:`.sources`      -- where entries come from (in-batch / in-row causal memory, ...)
* :mod:`.mixing`       -- turning entry scores into probabilities (joint softmax, interpolation)
* :mod:`.token_scores` -- the model's own token term (full or adaptive softmax)
* :mod:`.eval_memory`  -- evaluation-time memory behind ``get_normalized_probs``
* :mod:`.bank`         -- LongMem's per-stream, per-head key/value bank with token-to-chunk retrieval
"""
