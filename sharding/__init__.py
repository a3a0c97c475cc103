"""Models that do not fit one device: the partition plan (``plan``), the Ray pipeline driver
(``pipeline``), its data-parallel replicas (``replicas``), and a store-by-store comparison (``verify``).

Above the core (``harvest``'s spec, shape, stage, writer, store) and below ``harvest.runner``.
"""
