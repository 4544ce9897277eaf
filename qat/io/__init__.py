"""The only code that touches the disk layout and loads models: ``models`` (student, teacher,
tokenizer, dtypes), ``rundir`` (the run directory: create, check, clear, atomic writes),
``final`` (the ``final/`` artifact) and ``checkpoint`` (atomic checkpoints, resume)."""
