"""The data layer: corpus readers and token files (``corpus``), user SFT/preference formats (``formats``),
JSONL reading with file:line errors (``jsonio``), the data stage's build (``build``) and the datasets and
collators the training stages use (``datasets``). Nothing is imported here, so reading a format pulls in
neither torch nor the trackers."""
