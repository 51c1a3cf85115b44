"""The flywheel: sampled traffic becomes the next dataset (:mod:`.dataset`), then a trained,
evaluated and gated candidate (:mod:`.cycle`)."""
