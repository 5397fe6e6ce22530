"""The conformance suite, shipped with the package so that ``vtx suite`` runs it from anywhere:
``vtd/`` (DMA remapping, faults, interrupt remapping, invalidation, isolation) and ``vmx/``."""
