"""The one memory abstraction: (key, value) entries searched by a query.

* :mod:`.keys`         -- reading g (memory key) and f (output feature) from a model
* :mod:`.sources`      -- where entries come from (in-batch / in-row causal memory, ...)
* :mod:`.mixing`       -- turning entry scores into probabilities (joint softmax, interpolation)
* :mod:`.token_scores` -- the model's own token term (full or adaptive softmax)
* :mod:`.composition`  -- memory parts, terms and interpolation steps: what a composition is made of
* :mod:`.modes`        -- the evaluation modes, one record each (``@register_mode``)
* :mod:`.options`      -- the evaluation-memory options, validated against the mode's record
* :mod:`.compose`      -- a mode's composition for options, and the two combiners
* :mod:`.eval_parts`   -- the memory parts of one forward pass (gather, cache key)
* :mod:`.eval_memory`  -- evaluation-time memory behind ``get_normalized_probs`` (the three drivers)
* :mod:`.datastore`    -- the FAISS datastore: format, resumable writer, shard merge, reading, search
* :mod:`.bank`         -- LongMem's per-stream, per-head key/value bank with token-to-chunk retrieval
"""
