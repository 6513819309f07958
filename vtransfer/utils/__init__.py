"""Plumbing every wing may use; imports nothing else of vtransfer.

``errors`` (the typed user errors the CLI prints without a traceback),
``atomic`` (temp file + fsync + rename writes), ``hashing``, ``jsonable``,
``interrupts`` (one SIGINT mechanism), ``runtime`` (device, threads, precision,
seeding; torch-free at import), ``distributed`` (DDP helpers), ``memory_budget``
(``--max-memory``: what the process holds and what its holders may add), ``shapes``,
``version`` (the installed version, from the package metadata).
"""
