"""The trainer as a unit, built on ``metapl.core``, ``metapl.data`` and ``metapl.models``.

``config`` (TrainConfig, YAML and flags), ``runtime`` (device, distributed, optimizer, schedule, signals), ``run``
(one run's models, loaders and folder), ``train`` (the loop), ``checkpoint`` (the file format), ``metrics``
(metrics.jsonl / TensorBoard), ``evaluate`` and ``finetune``. Nothing here imports ``metapl.commands``; see
docs/architecture.md. The submodules are imported on use, so importing ``metapl.engine.config`` stays cheap.
"""
