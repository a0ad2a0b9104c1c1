"""Constants shared across lorakit, in a module that imports nothing."""

IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and HF models) skip
