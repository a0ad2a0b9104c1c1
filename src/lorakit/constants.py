"""Constants shared across lorakit, in a module that imports nothing."""

IGNORE_INDEX = -100  # the label value that torch's cross-entropy (and HF models) skip

# The built-in data sets, by name: the registry lorakit.data.builtin loads and --data's help lists.
ROTTEN_TOMATOES = "rotten-tomatoes"
SHAKESPEARE = "shakespeare"
SHAKESPEARE_DIALOGUE = "shakespeare-dialogue"
BUILTIN_DATA = (ROTTEN_TOMATOES, SHAKESPEARE, SHAKESPEARE_DIALOGUE)
