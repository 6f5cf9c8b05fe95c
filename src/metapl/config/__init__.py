"""The training configuration, torch-free: ``fields`` (``TrainConfig``, ``Schedule`` and the budget rules),
``option_text`` (an option's flag, parsed value and help line), ``flags`` (the command line), ``recipes`` (the shipped
YAML configs and ``load_yaml``) and ``rules`` (every rule between options: idle options, resume)."""
