"""Experiment execution: code generation, the sandbox contract and the attempt journal."""
