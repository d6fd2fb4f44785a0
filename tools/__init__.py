"""The ``xattn`` command line: thin click commands over the exporter, calibration and runtime libraries."""
