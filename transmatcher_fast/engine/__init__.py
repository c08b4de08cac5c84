"""Engine: everything that runs models over data — samplers, losses, training, evaluation,
metrics, re-ranking and pictures. Imports ``models``, ``data`` and ``ops``; nothing below imports it."""
