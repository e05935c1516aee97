"""`lora_ft.spam` is `lora_ft.classify` (its name before it was named for what it does: it classifies any labelled
text; `spam` stays the command and the default data). The same module object, so that patching one patches both."""

import sys

from . import classify

sys.modules[__name__] = classify
