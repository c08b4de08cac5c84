"""Engine: everything that runs models over data — samplers, training, evaluation, metrics,
re-ranking, exports and pictures — written once for every method. Imports ``methods``,
``models``, ``data`` and ``ops``; nothing below imports it.

Where new code goes: a new *method* or *model* does not come here (see ``methods`` and
``models``): the engine asks the parts what it needs (a matcher's ``correspondences`` and
``label``, a model's ``attention_maps`` or ``patch_groups``, ``methods.get_method(name)``) and
never names a method or tests a model's class. New work for every method goes in the module of its
concern (``evaluate``, ``trainer``, ``export``; pictures: ``visualize``, the one entry, over
``drawing``, ``correspondence_pictures``, ``training_curves`` and ``attention_pictures``); a new
*command* is a module of ``cli/`` over these functions."""
