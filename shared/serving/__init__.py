"""Serving personalized answers from one copy of the frozen base model.

- :mod:`.rows`: what one row of a mixed batch carries (:class:`RowAdapter`: low-rank updates,
  a PerFit intervention, or nothing) and the builders from each method's stored state.
- :mod:`.engine`: :class:`BatchedEngine`, greedy generation for a batch whose rows each have
  their own personalization (per-row gathered LoRA factors, per-row interventions).

Each method's core turns a user's state into a row with ``Core.serving_adapter``.
"""
