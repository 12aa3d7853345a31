"""Tools that measure models: ``compare`` (head to head on VQA benchmarks through LAVIS's tasks), ``stats`` (paired
bootstrap and McNemar), ``query_diversity`` (supplement section 6), ``params`` (parameter counts beside the paper),
``bench`` (time, memory, FLOPs), and ``figures`` (their charts and the demo's). ``compare``, ``params`` and ``bench``
are commands: ``python -m lavis_xformer.analysis.<tool>``."""
