"""VMX building blocks: VMCS encodings, control reconciliation, EPT tables, the VMM routines and
the scenario builder that turns a Python description of a guest into engine steps and data."""
